"""Budgets (train.max_samples, train.max_wall_s) and the compute counters in real toy runs.

Expected counts are derived by hand from configs/toy2d_advantageflow.yaml: 8 prompts x 16
samples = 128 rollout samples per epoch, 10 Euler steps (one network row per sample and step),
2 optimizer steps of 64 samples (one micro-batch each).  AdvantageFlow's loss passes per step:
the reference (lambda_ref > 0, no grad), the old policy (skipped on the epoch's first step,
where old == theta) and theta (with grad and a backward).
"""

from __future__ import annotations

import json

import pytest

from advantageflow.config import ConfigError, load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")
SAMPLES = 8 * 16
ROLLOUT_ROWS = SAMPLES * 10
STEP = 64
TRAIN_FWD = STEP * 2 + STEP * 3  # step 1: ref + theta; step 2: ref + old + theta
TRAIN_BWD = 2 * STEP
HIDDEN, DEPTH, TIME_DIM = 128, 3, 32  # toy_mlp defaults (time features are VelocityMLP's)
FLOPS_PER_ROW = 2 * ((2 + TIME_DIM) * HIDDEN + (DEPTH - 1) * HIDDEN * HIDDEN + HIDDEN * 2)


@pytest.fixture
def quick(toy_overrides) -> list[str]:
    return toy_overrides + ["train.epochs=50", "eval.samples_per_prompt=32", "checkpoint.every=100"]


def _epoch_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]


def test_max_samples_stops_at_the_crossing_epoch_like_a_finished_run(tmp_path, quick):
    run = tmp_path / "run"
    result = train(load_config(TOY, quick + ["eval.every=10", f"train.max_samples={2 * SAMPLES + 1}"]), run)
    assert result.epochs == 3 and result.samples == 3 * SAMPLES and result.stopped_by == "max_samples"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-000003"]
    rows = _epoch_rows(run)
    assert len(rows) == 3 and "eval/reward_mean" in rows[-1]  # final evaluation, though eval.every=10
    assert result.eval_after["eval/reward_mean"] == rows[-1]["eval/reward_mean"]
    for name in ("samples_after.png", "eval_after.json", "summary.txt", "eval_before_after.md"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_samples" and summary["epochs"] == 3
    assert "stopped by max_samples" in (run / "summary.txt").read_text()


def test_max_wall_s_stops_after_the_first_epoch_over_it(tmp_path, quick):
    result = train(load_config(TOY, quick + ["eval.every=0", "train.max_wall_s=1e-9"]), tmp_path / "run")
    assert result.epochs == 1 and result.stopped_by == "max_wall_s"
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000001").exists()
    ok = train(load_config(TOY, quick + ["train.epochs=2", "eval.every=0", "train.max_wall_s=1e6"]), tmp_path / "b")
    assert ok.epochs == 2 and ok.stopped_by == "epochs"


@pytest.mark.parametrize("key", ["train.max_wall_s", "train.max_samples"])
def test_negative_budget_is_refused(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TOY, [f"{key}=-1"])


def test_counters_equal_the_hand_count(tmp_path, quick):
    run = tmp_path / "run"
    train(load_config(TOY, quick + ["train.epochs=2", "eval.every=1"]), run)
    rows = _epoch_rows(run)
    eval_rows = 32 * 20  # 1 prompt x 32 samples x 20 Euler steps per evaluation
    for epoch, row in enumerate(rows, start=1):
        fwd, bwd = epoch * (ROLLOUT_ROWS + TRAIN_FWD), epoch * TRAIN_BWD
        assert row["perf/network_rows_fwd"] == fwd and row["perf/network_rows_bwd"] == bwd
        # Evaluation is counted apart: before training, then after every epoch.
        assert row["perf/eval_network_rows_fwd"] == (epoch + 1) * eval_rows
        assert row["perf/flops"] == FLOPS_PER_ROW * (fwd + 2 * bwd)
        assert row["perf/eval_flops"] == FLOPS_PER_ROW * (epoch + 1) * eval_rows


def test_resume_after_a_budget_stop_continues_counters_and_training(tmp_path, quick):
    base = quick + ["eval.every=0"]
    full = train(load_config(TOY, base + [f"train.max_samples={5 * SAMPLES}"]), tmp_path / "full")
    first = train(load_config(TOY, base + [f"train.max_samples={3 * SAMPLES}"]), tmp_path / "resumed")
    assert first.epochs == 3 and first.stopped_by == "max_samples"
    # Resumed with the budget spent: nothing more to train.
    again = train(load_config(TOY, base + [f"train.max_samples={3 * SAMPLES}"]), tmp_path / "resumed", resume=True)
    assert again.epochs == 3 and again.stopped_by == "max_samples" and len(_epoch_rows(tmp_path / "resumed")) == 3
    # A larger budget continues to it, exactly as the uninterrupted run.
    resumed = train(load_config(TOY, base + [f"train.max_samples={5 * SAMPLES}"]), tmp_path / "resumed",
                    resume=True)
    assert resumed.epochs == full.epochs == 5 and resumed.stopped_by == "max_samples"
    keep = ("reward/", "loss/", "stats/", "perf/network_rows", "perf/flops", "perf/eval_", "epoch", "step")
    a, b = ([{k: v for k, v in r.items() if k.startswith(keep)} for r in _epoch_rows(tmp_path / w)]
            for w in ("full", "resumed"))
    assert a == b
    assert b[-1]["perf/network_rows_fwd"] == 5 * (ROLLOUT_ROWS + TRAIN_FWD)
    assert resumed.compute == full.compute
    # Wall time keeps adding up over the parts of the run.
    parts = sum(r["perf/epoch_s"] for r in _epoch_rows(tmp_path / "resumed"))
    assert resumed.wall_s == pytest.approx(parts, rel=1e-9)
