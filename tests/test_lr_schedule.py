"""``train.lr_schedule``: the learning rate of each optimizer step is a pure function of the
step (closed forms below), the trainer applies and logs it, and a resumed run continues it."""

from __future__ import annotations

import math

import pytest

from advantageflow.config import load_config
from advantageflow.configbase import ConfigError
from advantageflow.optim import scheduled_lr
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def _train_cfg(*overrides: str):
    return load_config(TOY, ["train.epochs=5", "train.steps_per_epoch=2", *overrides]).train


def test_constant_is_the_config_lr_at_every_step():
    tc = _train_cfg("train.lr=3e-4")
    assert [scheduled_lr(tc, k) for k in range(12)] == [3e-4] * 12


def test_cosine_runs_from_lr_to_lr_final_at_the_last_step():
    tc = _train_cfg("train.lr=4e-4", "train.lr_schedule=cosine", "train.lr_final=1e-5")
    last = 5 * 2 - 1
    assert scheduled_lr(tc, 0) == pytest.approx(4e-4)
    assert scheduled_lr(tc, last) == pytest.approx(1e-5)
    # lr_final + (lr - lr_final) (1 + cos(pi k / last)) / 2, step by step
    for k in range(last + 1):
        assert scheduled_lr(tc, k) == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * k / last)))
    assert scheduled_lr(tc, last + 5) == pytest.approx(1e-5)  # held after the end (a resumed, extended run)


def test_warm_up_is_linear_then_the_schedule():
    tc = _train_cfg("train.lr=2e-4", "train.lr_warmup_steps=4")
    assert [scheduled_lr(tc, k) for k in range(6)] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4])
    tc = _train_cfg("train.lr=2e-4", "train.lr_warmup_steps=4", "train.lr_schedule=cosine")
    assert scheduled_lr(tc, 3) == pytest.approx(2e-4)
    assert scheduled_lr(tc, 9) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["train.lr_schedule=cosine", "train.lr_final=0.1"], "lr_final must be in"),
    (["train.lr_final=1e-5"], "set train.lr_schedule=cosine"),
    (["train.lr_warmup_steps=-1"], "lr_warmup_steps must be >= 0"),
    (["train.lr_schedule=linear"], "lr_schedule"),
])
def test_bad_schedules_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TOY, overrides)


def _rows(run_dir) -> list[dict]:
    keep = ("reward/mean", "reward/std", "loss/", "stats/")  # not the reward components: named by class
    return [{k: v for k, v in r.items() if k.startswith(keep)}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]


def test_trainer_applies_and_logs_the_schedule_and_a_resume_continues_it(tmp_path, toy_overrides):
    base = [*toy_overrides, "train.epochs=6", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=5",
            "train.lr_schedule=cosine", "train.lr=3e-3", "train.lr_final=3e-4"]
    cfg = load_config(TOY, base)
    train(cfg, tmp_path / "full")
    rows = _rows(tmp_path / "full")
    steps = cfg.train.steps_per_epoch
    # each epoch's logged lr is the mean over its optimizer steps
    expected = [sum(scheduled_lr(cfg.train, e * steps + k) for k in range(steps)) / steps for e in range(6)]
    assert [r["stats/lr"] for r in rows] == pytest.approx(expected)
    assert expected[0] > expected[-1] * 3

    # The same run killed after its epoch-3 checkpoint and resumed: identical, lr included.
    crashing = [*base, "reward.name=tests.helpers_rewards:CrashingModeReward", "reward.args={crash_at: 5}"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(TOY, crashing), tmp_path / "resumed")
    train(load_config(TOY, base), tmp_path / "resumed", resume=True, allow_config_change=True)
    assert _rows(tmp_path / "resumed") == rows

    # lr_final = lr makes the cosine the constant schedule: the same training
    flat = [*toy_overrides, "train.epochs=2", "eval.every=0", "train.lr=3e-3"]
    train(load_config(TOY, flat), tmp_path / "constant")
    train(load_config(TOY, [*flat, "train.lr_schedule=cosine", "train.lr_final=3e-3"]), tmp_path / "cosine")
    assert _rows(tmp_path / "constant") == _rows(tmp_path / "cosine")

    # and the schedule changes the training (not a logged number only)
    train(load_config(TOY, [*flat, "train.lr_schedule=cosine", "train.lr_final=0"]), tmp_path / "decayed")
    assert _rows(tmp_path / "decayed")[1]["loss/total"] != _rows(tmp_path / "constant")[1]["loss/total"]
