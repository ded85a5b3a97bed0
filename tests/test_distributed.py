"""Two gloo processes under torchrun against one process with the same global batch, for
every strategy (DDP, FSDP2, flat all-reduce), algorithm and kind of model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advantageflow.checkpoint import latest_checkpoint, load_checkpoint
from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO
from tests.dist_cases import ALGOS, run_cases

pytestmark = pytest.mark.two_cores  # 2 processes: one xdist worker runs these (tests/conftest.py)

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _args(toy_overrides, *extra):
    return [*toy_overrides, "eval.every=0", "checkpoint.every=2", *extra]


def _torchrun(args: list[str], run_dir: Path, resume: bool = False, timeout: float = 240):
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "advantageflow", "train", TOY, *args,
           "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _rows(run_dir: Path) -> list[dict]:
    keep = ("reward/mean", "reward/std", "loss/", "stats/")
    return [{k: v for k, v in r.items() if k.startswith(keep) or k in ("step", "epoch")}
            for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["epoch"], k)


@pytest.fixture(scope="module")
def warm_cache(toy_cache):
    """Pretrain the toy base model once, so two processes do not race to build it."""
    cfg = load_config(TOY, [f"model.cache_dir={toy_cache}", "model.pretrain_steps=1500"])
    from advantageflow.build import build_policy

    build_policy(cfg, "cpu")
    return toy_cache


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "allreduce"])
def test_two_processes_match_one(tmp_path, toy_overrides, warm_cache, strategy):
    """The issue's 'done when': the CLI under torchrun logs the single-process metrics."""
    args = _args(toy_overrides, "train.epochs=4", f"dist.strategy={strategy}")
    train(load_config(TOY, args), tmp_path / "one")
    out = _torchrun(args, tmp_path / "two")
    assert out.returncode == 0, out.stderr[-3000:]
    # The finished workers skip the interpreter's teardown (cli.py): their output still arrives.
    assert out.stdout.count("[advantageflow] advantageflow on toy2d:") == 1, out.stdout[-2000:]
    _assert_same(_rows(tmp_path / "one"), _rows(tmp_path / "two"))
    # Cost counters are summed over the processes: the same work, the same count.
    counters = ("perf/network_rows_fwd", "perf/network_rows_bwd", "perf/flops")
    one, two = ([{k: r[k] for k in counters} for r in read_metrics(tmp_path / w / "metrics.jsonl")
                 if "reward/mean" in r] for w in ("one", "two"))
    assert one == two and one[-1]["perf/network_rows_fwd"] > 0


# Every algorithm under DDP and FSDP2 on the 2-D task (Flow-GRPO filtering groups unevenly, so
# processes pad with zero-weight micro-batches), the shipped DiT (blocks sharded one by one),
# and the tiny SD3 pipeline: LoRA under DDP and FSDP2, full fine-tuning under FSDP2.
MATRIX = [f"{a}-{s}" for a in ALGOS for s in ("ddp", "fsdp")] + [
    "shapes-ddp", "shapes-fsdp", "sd3lora-ddp", "sd3lora-fsdp", "sd3full-fsdp"]
BF16 = "shapes-fsdpbf16"


def test_every_algorithm_and_model_trains_the_same_in_two_processes(tmp_path, warm_cache):
    pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "tests.dist_cases",
           str(tmp_path / "two"), warm_cache, *MATRIX, BF16]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    run_cases(tmp_path / "one", MATRIX, [f"model.cache_dir={warm_cache}", "model.pretrain_steps=1500"])
    # bf16 compute is not float32's: close to the float32 single-process run, not equal.
    fp32, bf16 = (load_checkpoint(latest_checkpoint(tmp_path / w / "checkpoints")).policy
                  for w in ("one/shapes-fsdp", "two/shapes-fsdpbf16"))
    moved = max(float((bf16[k] - fp32[k]).abs().max()) for k in fp32)
    assert 0 < moved < 5e-3 and all(bool(torch.isfinite(v).all()) for v in bf16.values())
    for case in MATRIX:
        one, two = (load_checkpoint(latest_checkpoint(tmp_path / w / case / "checkpoints")) for w in ("one", "two"))
        assert one.policy.keys() == two.policy.keys()
        for name in one.policy:
            assert torch.allclose(one.policy[name], two.policy[name], rtol=1e-4, atol=1e-5), (case, name)
        rows_one, rows_two = (read_metrics(tmp_path / w / case / "metrics.jsonl") for w in ("one", "two"))
        _assert_same(_comparable(rows_one), _comparable(rows_two))
    padded = [r["perf/padded_microbatches"] for r in read_metrics(tmp_path / "two" / "flow_grpo-fsdp" / "metrics.jsonl")
              if "perf/padded_microbatches" in r]
    assert sum(padded) > 0, "the uneven case did not pad: the test lost its point"
    # The strategies really wrapped: DDP routes the forward, FSDP2 halves what each process holds.
    reports = [json.loads((tmp_path / "two" / f"wrapping-{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["ddp"]["ddp_forward"] and not rep["ddp"]["trained_sharded"]
        assert rep["fsdp"]["trained_sharded"] and rep["fsdp"]["reference_sharded"]
        assert rep["ddp"]["elements_here"] == rep["ddp"]["elements_total"]
    assert sum(rep["fsdp"]["elements_here"] for rep in reports) == reports[0]["fsdp"]["elements_total"]
    assert max(rep["fsdp"]["elements_here"] for rep in reports) < 0.51 * reports[0]["fsdp"]["elements_total"]


def _comparable(rows: list[dict]) -> list[dict]:
    """Metrics that must not depend on the number of processes (all but timings / memory)."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "samples"} for r in rows]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoints_cross_world_sizes(tmp_path, toy_overrides, warm_cache, strategy):
    full = _args(toy_overrides, "train.epochs=4", f"dist.strategy={strategy}")
    half = _args(toy_overrides, "train.epochs=2", f"dist.strategy={strategy}")
    train(load_config(TOY, full), tmp_path / "ref")
    # 2 processes write (sharded under FSDP: the checkpoint holds whole tensors), 1 resumes
    out = _torchrun(half, tmp_path / "a")
    assert out.returncode == 0, out.stderr[-3000:]
    train(load_config(TOY, full), tmp_path / "a", resume=True)
    _assert_same(_rows(tmp_path / "ref"), _rows(tmp_path / "a"))
    # 1 process writes, 2 resume
    train(load_config(TOY, half), tmp_path / "b")
    out = _torchrun(full, tmp_path / "b", resume=True)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same(_rows(tmp_path / "ref"), _rows(tmp_path / "b"))
    final = [load_checkpoint(latest_checkpoint(tmp_path / r / "checkpoints")) for r in ("ref", "a", "b")]
    for name in final[0].policy:
        for other in final[1:]:
            assert torch.allclose(final[0].policy[name], other.policy[name], rtol=1e-4, atol=1e-6)
    assert final[2].trainer["world_size"] == 2 and final[2].trainer["strategy"] == strategy


# Run under torchrun: train() initialises the process group itself, so it destroys it at the end.
OWN_GROUP = """
import os
import sys
import torch.distributed as dist
from advantageflow.config import load_config
from advantageflow.trainer import train

train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
print("group after train:", dist.is_initialized())
# Destroyed means freed: gloo's threads must not outlive the interpreter (they can abort it).
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads after train:", sum("gloo" in name for name in threads))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.parametrize("strategy", ["ddp", "allreduce"])
def test_train_destroys_the_process_group_it_initialised(tmp_path, toy_overrides, warm_cache, strategy):
    """Destroyed and freed: a gloo group that outlives the interpreter can abort a finished run
    (torch keeps FSDP2's alive through DTensor's caches; the CLI exits before teardown then)."""
    script = tmp_path / "own_group.py"
    script.write_text(OWN_GROUP)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), TOY, str(tmp_path / "run"),
           *_args(toy_overrides, "train.epochs=1", f"dist.strategy={strategy}")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("group after train: False") == 2, out.stdout
    assert out.stdout.count("gloo threads after train: 0") == 2, out.stdout


def test_an_env_leaves_a_process_group_it_did_not_create(monkeypatch):
    import torch.distributed as dist

    from advantageflow.distributed import DistEnv

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        env = DistEnv.from_environment("cpu")
        assert env.active and not env.owns_group
        env.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_rank_ends_the_run(tmp_path, toy_overrides, warm_cache, mode):
    args = _args(toy_overrides, "train.epochs=6", "dist.timeout_s=20",
                 "reward.name=tests.helpers_rewards:RankFaultReward", f"reward.args={{mode: {mode}, at: 4}}")
    start = time.time()
    out = _torchrun(args, tmp_path / "run", timeout=200)
    elapsed = time.time() - start
    assert out.returncode != 0
    assert elapsed < 150
    if mode == "raise":
        assert "simulated failure on rank 1" in out.stderr
    else:
        assert "timed out" in out.stderr.lower() or "timeout" in out.stderr.lower()
    # The checkpoint written before the failure is intact.
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000002" / "trainer.json").exists()
