"""Two gloo processes under torchrun against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _args(toy_overrides, *extra):
    return [*toy_overrides, "eval.every=0", "train.micro_batch_size=16", "checkpoint.every=2", *extra]


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


def test_two_processes_match_one(tmp_path, toy_overrides, warm_cache):
    args = _args(toy_overrides, "train.epochs=4")
    train(load_config(TOY, args), tmp_path / "one")
    out = _torchrun(args, tmp_path / "two")
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same(_rows(tmp_path / "one"), _rows(tmp_path / "two"))


def test_checkpoints_cross_world_sizes(tmp_path, toy_overrides, warm_cache):
    full = _args(toy_overrides, "train.epochs=4")
    train(load_config(TOY, full), tmp_path / "ref")
    # 2 processes write, 1 resumes
    out = _torchrun(_args(toy_overrides, "train.epochs=2"), tmp_path / "a")
    assert out.returncode == 0, out.stderr[-3000:]
    train(load_config(TOY, full), tmp_path / "a", resume=True)
    _assert_same(_rows(tmp_path / "ref"), _rows(tmp_path / "a"))
    # 1 process writes, 2 resume
    train(load_config(TOY, _args(toy_overrides, "train.epochs=2")), tmp_path / "b")
    out = _torchrun(full, tmp_path / "b", resume=True)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same(_rows(tmp_path / "ref"), _rows(tmp_path / "b"))


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
