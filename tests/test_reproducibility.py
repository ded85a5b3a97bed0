"""The same config and seed give the same numbers whatever the torch thread count (issue 13).

The end-to-end check runs the main job's first two epochs (``advantageflow train`` with no
config, evaluation cut down) in two processes, one with 1 torch thread and one with 2, each
with its own Python hash seed, and asks for the same ``metrics.jsonl`` bit for bit, timing and
memory figures aside.  Before :mod:`advantageflow.numerics` the losses and gradient norms of
both epochs differed in the 7th-9th digit (MKL ``sgemm`` and oneDNN convolution weight
gradients split their sums by thread).  The in-process checks name the parameter whose
gradient differs when a model change brings a thread-dependent kernel back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advantageflow.algorithms import ALGORITHMS
from advantageflow.algorithms.base import TrainContext
from advantageflow.build import build_components
from advantageflow.config import load_config
from advantageflow.numerics import blas_mode, numerics_header, numerics_record, thread_invariant_kernels
from advantageflow.rollouts import encode_prompts
from advantageflow.sampling import bind_velocity, sample
from advantageflow.seeding import RowRandom, seeded_generator
from advantageflow.types import Rollout

REPO = Path(__file__).resolve().parents[1]
# Wall-clock and memory figures are the machine's, not the run's.
MACHINE_KEYS = re.compile(r"^perf/.*(_s|_gb)$")
QUICK = ["train.epochs=2", "eval.every=1", "eval.num_prompts=12", "eval.samples_per_prompt=1",
         "log.progress=false", "log.tensorboard=false", "checkpoint.every=100"]


def _run_main_job(run_dir: Path, threads: int, hash_seed: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONHASHSEED=str(hash_seed), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "advantageflow", "train", *QUICK, "--run-dir", str(run_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _comparable(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not MACHINE_KEYS.match(k)} for row in rows]


@pytest.mark.slow
@pytest.mark.two_cores
def test_main_job_metrics_do_not_depend_on_thread_count(tmp_path):
    runs = {n: tmp_path / f"threads-{n}" for n in (1, 2)}
    procs = {n: _run_main_job(d, n, hash_seed=n) for n, d in runs.items()}
    for n, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{n}-thread run failed:\n{out[-3000:]}"
    records = {n: json.loads((d / "summary.json").read_text())["numerics"] for n, d in runs.items()}
    assert [records[n]["threads"] for n in (1, 2)] == [1, 2]  # the two runs did differ in threads
    assert all(r["strict"] in (True, None) for r in records.values()), records
    one, two = (_comparable(runs[n] / "metrics.jsonl") for n in (1, 2))
    assert len(one) == len(two) == 3  # before training, epoch 1, epoch 2
    assert {k for k in one[1] if k.startswith("loss/")} and "eval/strict" in one[2]
    for row_one, row_two in zip(one, two):
        assert list(row_one) == list(row_two)  # same keys in the same order (hash seeds differ)
        differ = {k: (row_one[k], row_two[k]) for k in row_one if row_one[k] != row_two[k]}
        assert not differ, f"epoch {row_one['epoch']}: 1 vs 2 threads differ in {differ}"
    assert all(runs[n].joinpath("config.yaml").read_text().startswith("# numerics: ") for n in runs)


def _main_job_batch(threads: int = 1):
    """The shipped policy and algorithm of the main job, and one micro-batch of rollouts."""
    torch.set_num_threads(threads)
    cfg = load_config(None, ["sampler.steps=2"])
    torch.manual_seed(cfg.seed)
    parts = build_components(cfg, "cpu")
    policy, task = parts.policy, parts.task
    algo = ALGORITHMS.get(cfg.algo)(cfg.algorithm, policy)
    # one micro-batch of the main job: with fewer rows the sums inside a weight gradient are too
    # short for the kernels to split them, and the check could not fail
    train = task.train_prompts()
    prompts = [train[i % len(train)] for i in range(cfg.train.micro_batch_size)]
    noise = torch.randn((len(prompts), *policy.sample_shape), generator=seeded_generator(cfg.seed, "test"))
    grid = policy.time_grid(2, 1.0)
    with torch.no_grad():
        cond = encode_prompts(policy, prompts)
        out = sample(bind_velocity(policy, cond, 1.0), noise, grid)
    batch = Rollout(x0=out.x0, noise=noise, cond=cond, prompts=[p.text for p in prompts], grid=grid,
                    metadata=[p.metadata for p in prompts], group_ids=torch.arange(len(prompts)),
                    advantages=torch.linspace(-1, 1, len(prompts)))
    return cfg, policy, algo, batch


def _gradients(cfg, policy, algo, batch, threads: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    algo.begin_epoch(policy)
    ctx = TrainContext(policy=policy, generator=seeded_generator(cfg.seed, "loss"),
                       rows=RowRandom([(cfg.seed, "loss", i) for i in range(len(batch))]), step=0, reward=None,
                       guidance_scale=1.0)
    named = list(policy.trainable_named_parameters())
    for _, p in named:
        p.grad = None
    for term in algo.losses(batch, ctx):
        term.loss.backward()
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


# Not marked two_cores: it holds 2 threads for a few seconds only, and the other xdist worker has
# the time (the two_cores group is the suite's longest path; scripts/test.sh).
def test_main_job_model_gradients_do_not_depend_on_thread_count():
    """One loss and backward pass of the main job's model and algorithm under 1, 2 and 4 threads:
    every gradient equal bit for bit (in-process, so it names the culprit)."""
    if blas_mode()["strict"] is False:
        pytest.fail("MKL is not in strict mode: something used MKL before advantageflow was imported")
    cfg, policy, algo, batch = _main_job_batch()
    previous = torch.get_num_threads()
    try:
        with thread_invariant_kernels():
            one = _gradients(cfg, policy, algo, batch, 1)
            two = _gradients(cfg, policy, algo, batch, 2)
            four = _gradients(cfg, policy, algo, batch, 4)  # README: 1, 2 and 4 threads (not 3)
    finally:
        torch.set_num_threads(previous)
    assert one and list(one) == list(two) == list(four)
    differ = [name for name in one if not (torch.equal(one[name], two[name]) and torch.equal(one[name], four[name]))]
    assert not differ, f"gradients that depend on the thread count: {differ}"


def test_thread_invariant_kernels_turn_onednn_off_and_back():
    before = torch.backends.mkldnn.enabled
    with thread_invariant_kernels():
        assert torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled == before


def test_numerics_record_names_what_the_numbers_depend_on():
    rec = numerics_record()
    assert rec["torch"] == torch.__version__
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["threads"] == torch.get_num_threads()
    json.dumps(rec)  # goes into summary.json
    if torch.backends.mkl.is_available() and rec["strict"] is not None:
        assert rec["mkl_cbwr"].endswith(",STRICT") == rec["strict"]
    header = numerics_header(rec)
    assert header.startswith("# numerics: ") and header.count("\n") == 1
