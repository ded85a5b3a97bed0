"""Reliability: kill -9 at random moments and resume, NaN losses, bad input, disk checks."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from advantageflow.checkpoint import latest_checkpoint, load_checkpoint
from advantageflow.cli import main
from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import TrainingError, train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def _rows(run_dir) -> list[dict]:
    keep = ("reward/mean", "reward/std", "loss/", "stats/", "eval/")
    return [{k: v for k, v in r.items() if k.startswith(keep) or k in ("step", "epoch")}
            for r in read_metrics(run_dir / "metrics.jsonl")]


def test_kill9_at_ten_random_points_then_resume_matches_uninterrupted(tmp_path, toy_overrides):
    args = [*toy_overrides, "train.epochs=16", "eval.every=8", "eval.samples_per_prompt=256",
            "checkpoint.every=1", "checkpoint.keep=2"]
    train(load_config(TOY, args), tmp_path / "full")  # also warms the toy model cache

    rng = random.Random(1234)
    phases = ["rollout", "reward", "train", "checkpoint"]
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "advantageflow", "train", TOY, *args, "--run-dir", str(run), "--resume"]
    kills = 0
    for _ in range(10):
        phase = rng.choice(phases)
        hits_per_epoch = 2 if phase == "train" else 1  # 2 optimizer steps per epoch
        at = rng.randint(1, 2 * hits_per_epoch)
        out = subprocess.run(cmd, env={**env, "ADVANTAGEFLOW_KILL_AT": f"{phase}:{at}"},
                             capture_output=True, text=True, timeout=300)
        if out.returncode == -9:
            kills += 1
        else:
            assert out.returncode == 0, out.stderr[-2000:]
        # Whatever was killed, the newest complete checkpoint always loads.
        latest = latest_checkpoint(run / "checkpoints")
        if latest is not None:
            load_checkpoint(latest)
    assert kills >= 8
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _rows(tmp_path / "full") == _rows(run)


def test_nan_losses_are_skipped_counted_and_stop_the_run(tmp_path, toy_overrides):
    base = [*toy_overrides, "eval.every=0", "checkpoint.every=1",
            "algo=tests.helpers_algos:NaNLossAdvantageFlow"]
    cfg = load_config(TOY, [*base, "train.epochs=3", "NaNLossAdvantageFlow.nan_step=1"])
    train(cfg, tmp_path / "once")
    rows = read_metrics(tmp_path / "once" / "metrics.jsonl")
    assert rows[0].get("stats/skipped_updates") == 1
    ck = load_checkpoint(latest_checkpoint(tmp_path / "once" / "checkpoints"))
    assert all(torch.isfinite(t).all() for t in ck.policy.values())
    assert ck.trainer["loop"]["step"] == 5  # 6 steps tried, 1 skipped

    cfg = load_config(TOY, [*base, "train.epochs=5", "train.max_bad_steps=3",
                            "NaNLossAdvantageFlow.nan_step=2", "NaNLossAdvantageFlow.nan_times=100"])
    with pytest.raises(TrainingError, match="non-finite loss or gradient in 3 consecutive updates"):
        train(cfg, tmp_path / "stuck")


def test_full_disk_is_detected_before_training(tmp_path, toy_overrides, monkeypatch):
    from advantageflow import trainer

    free = trainer.shutil.disk_usage(tmp_path).free / 2**20
    with pytest.raises(TrainingError, match="MB free"):
        trainer.check_run_dir(tmp_path / "run", min_free_mb=free * 10)


@pytest.mark.parametrize("argv,message", [
    (["validate", TOY, "train.group_size=1"], "group_size must be >= 2"),
    (["validate", TOY, "train.prompts_per_epoch=3", "train.group_size=3"], "must divide"),
    (["validate", TOY, "train.lr=fast"], "'train.lr' must be a number"),
    (["validate", TOY, "task.name=prompts"], "unknown config key 'task.rewarded_modes'"),
    (["eval", "task.name=prompts", "task.path=/nonexistent.txt"], "prompt file '/nonexistent.txt' does not exist"),
    (["eval", "--checkpoint", "/nonexistent-run"], "neither a checkpoint nor a run folder"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_malformed_prompt_files(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    assert main(["eval", "task.name=prompts", f"task.path={bad}"]) == 2
    assert "p.jsonl:2: each line needs a string 'prompt'" in capsys.readouterr().err
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    assert main(["eval", "task.name=prompts", f"task.path={empty}"]) == 2
    assert "holds no prompts" in capsys.readouterr().err


def test_reward_with_wrong_shape_is_a_clear_error(tmp_path, toy_overrides, capsys):
    argv = ["train", TOY, *toy_overrides, "train.epochs=1", "eval.every=0", "--run-dir", str(tmp_path / "r"),
            "reward.name=tests.helpers_rewards:WrongShapeReward", "reward.args={}"]
    assert main(argv) == 1  # a runtime failure (usage errors are 2)
    assert "returned shape (5,), expected (128,)" in capsys.readouterr().err


def test_corrupt_checkpoint_on_resume_is_one_line(tmp_path, toy_overrides, capsys):
    run = tmp_path / "r"
    argv = ["train", TOY, *toy_overrides, "train.epochs=1", "eval.every=0", "--run-dir", str(run)]
    assert main(argv) == 0
    (latest_checkpoint(run / "checkpoints") / "optimizer.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "skipping checkpoint" in err[0] and "optimizer.pt has 7 bytes" in err[0]
    assert len(err) == 2 and "no intact checkpoint" in err[1]
