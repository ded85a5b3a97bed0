"""The training loop end to end on the 2-D task: reward rises, runs are reproducible,
resuming continues exactly, the run folder has what a person opens."""

from __future__ import annotations

import json
import threading
import time

import pytest

from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import TrainingError, train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def _train_rows(run_dir) -> list[dict]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    keep = ("reward/mean", "reward/std", "loss/", "stats/")
    return [{k: v for k, v in r.items() if k.startswith(keep) or k in ("step", "epoch")}
            for r in rows if "reward/mean" in r]


def test_toy_run_raises_reward_and_writes_run_folder(tmp_path, toy_overrides):
    cfg = load_config(TOY, toy_overrides + ["train.epochs=20", "eval.every=10", "log.tensorboard=true"])
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    before, after = result.eval_before["eval/reward_mean"], result.eval_after["eval/reward_mean"]
    assert after > before + 0.25, (before, after)
    for name in ("config.yaml", "metrics.jsonl", "reward_curve.png", "samples_before.png", "samples_after.png",
                 "summary.txt", "summary.json", "eval_before_after.md"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.*"))
    rows = read_metrics(run / "metrics.jsonl")
    assert all("step" in r for r in rows)
    assert sum("reward/mean" in r for r in rows) == 20
    assert "->" in (run / "summary.txt").read_text()
    assert load_config(str(run / "config.yaml")).to_dict() == cfg.to_dict()
    # The anchors keep the shape of the kept modes: the spread stays near the data's.
    assert 0.6 < result.eval_after["eval/mode_std_ratio"] < 1.4


def test_fixed_seed_gives_identical_runs(tmp_path, toy_overrides):
    cfg = load_config(TOY, toy_overrides + ["train.epochs=4", "eval.every=0"])
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    assert _train_rows(tmp_path / "a") == _train_rows(tmp_path / "b")


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, toy_overrides):
    base = toy_overrides + ["train.epochs=10", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=5"]
    train(load_config(TOY, base), tmp_path / "full")

    crashing = base + ["reward.name=tests.helpers_rewards:CrashingModeReward", "reward.args={crash_at: 8}"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(TOY, crashing), tmp_path / "resumed")
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000003", "ckpt-000006"]
    # the crash was simulated by another reward (the same scores until it raises): allowed explicitly
    train(load_config(TOY, base), tmp_path / "resumed", resume=True, allow_config_change=True)
    assert _train_rows(tmp_path / "full") == _train_rows(tmp_path / "resumed")


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, toy_overrides):
    cfg = load_config(TOY, toy_overrides + ["train.epochs=1", "eval.every=0"])
    train(cfg, tmp_path / "run")
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, tmp_path / "run")


def test_nonfinite_rewards_skip_updates_then_stop(tmp_path, toy_overrides):
    cfg = load_config(TOY, toy_overrides + [
        "train.epochs=10", "eval.every=0", "checkpoint.every=1", "train.max_bad_steps=3",
        "reward.name=tests.helpers_rewards:NaNReward", "reward.args={bad_from: 3}",
    ])
    with pytest.raises(TrainingError, match="non-finite rewards or samples in 3 consecutive"):
        train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("stats/skipped_updates") for r in rows] == [None, None, 1, 2]
    summary = json.loads((tmp_path / "run" / "checkpoints" / "ckpt-000004" / "trainer.json").read_text())
    assert summary["loop"]["bad_updates"] == 2


def test_unwritable_run_dir_fails_before_training(tmp_path, toy_overrides):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(TOY, toy_overrides + ["train.epochs=1"])
    with pytest.raises(TrainingError, match="not writable"):
        train(cfg, blocker / "run")


def test_async_scoring_overlapping_sampling_gives_identical_runs(tmp_path, toy_overrides):
    base = toy_overrides + ["train.epochs=3", "eval.every=0", "sampler.batch_size=32"]
    train(load_config(TOY, base), tmp_path / "sync")
    train(load_config(TOY, base + ["reward.async_scoring=true"]), tmp_path / "async")
    assert _train_rows(tmp_path / "sync") == _train_rows(tmp_path / "async")


def test_a_failing_run_shuts_its_reward_scorer_down(tmp_path, toy_overrides):
    def scorer_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("reward")}

    before = scorer_threads()
    crashing = toy_overrides + ["train.epochs=3", "eval.every=0", "reward.async_scoring=true",
                                "reward.name=tests.helpers_rewards:CrashingModeReward", "reward.args={crash_at: 2}"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(TOY, crashing), tmp_path / "run")
    deadline = time.monotonic() + 10  # shut down without waiting: the idle worker leaves soon after
    while scorer_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scorer_threads() - before


@pytest.mark.parametrize("algo", ["advantageflow", "awm", "epg"])
def test_micro_batch_size_does_not_change_the_run(tmp_path, toy_overrides, algo):
    """Per-sample draws are keyed by global sample index and shared draws by the step, so how
    a step's batch is cut into micro-batches (or processes) changes nothing but rounding."""
    base = str(REPO / "configs" / f"toy2d_{algo}.yaml")
    runs = []
    for size in (64, 16, 7):
        args = toy_overrides + ["train.epochs=3", "eval.every=0", f"train.micro_batch_size={size}"]
        train(load_config(base, args), tmp_path / str(size))
        runs.append(_train_rows(tmp_path / str(size)))
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for ra, rb in zip(runs[0], other):
            for k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (algo, ra["epoch"], k)


def test_weights_ema_uses_the_released_warm_up():
    """``d = min((1 + n) / (10 + n), max)`` after ``n`` optimizer steps (from 1): the first
    update keeps 2/11 of the initial weights."""
    import torch

    from advantageflow.evaluation import WeightsEMA
    from advantageflow.models.toy import ToyMLPPolicy, VelocityMLP

    torch.manual_seed(0)
    policy = ToyMLPPolicy(VelocityMLP(2, hidden=16, depth=1))
    ema = WeightsEMA(policy, 0.9)
    assert [ema.decay(n) for n in (1, 8, 80, 1000)] == pytest.approx([2 / 11, 0.5, 0.9, 0.9])
    init = policy.snapshot()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    ema.update(policy, 1)
    for e, i, p in zip(ema.params, init, policy.trainable_parameters()):
        torch.testing.assert_close(e, 2 / 11 * i + 9 / 11 * p.detach())


def _eval_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run_dir / "metrics.jsonl")
            if any(k.startswith("eval/") for k in r)]


def test_eval_ema_is_evaluated_and_survives_a_resume(tmp_path, toy_overrides):
    base = toy_overrides + ["train.epochs=3", "eval.every=1", "eval.samples_per_prompt=128", "checkpoint.every=2",
                            "checkpoint.keep=5"]
    train(load_config(TOY, base), tmp_path / "plain")
    with_ema = base + ["eval.ema_decay=0.9"]
    train(load_config(TOY, with_ema), tmp_path / "full")
    plain, full = _eval_rows(tmp_path / "plain"), _eval_rows(tmp_path / "full")
    assert plain[0] == full[0]  # before training the average is the initial weights
    assert plain[1:] != full[1:]  # then the evaluated weights differ: the average is used
    assert _train_rows(tmp_path / "plain") == _train_rows(tmp_path / "full")  # training is untouched
    train(load_config(TOY, [*toy_overrides, "train.epochs=2", *base[len(toy_overrides) + 1:], "eval.ema_decay=0.9"]),
          tmp_path / "resumed")
    train(load_config(TOY, with_ema), tmp_path / "resumed", resume=True)
    assert _eval_rows(tmp_path / "resumed") == full  # the average came back from the checkpoint


def test_diffusion_nft_rolls_out_with_its_old_policy(tmp_path, toy_overrides):
    """The trainer samples through the algorithm's ``rollout_policy``: with DiffusionNFT's old
    policy (released) the first epoch's rollouts equal theta's (old == theta then) and the
    second's differ from a run that samples with theta (same training until then)."""
    config = str(REPO / "configs" / "toy2d_diffusion_nft.yaml")
    base = toy_overrides + ["train.epochs=2", "eval.every=0"]
    train(load_config(config, base), tmp_path / "old")
    train(load_config(config, base + ["diffusion_nft.rollout_policy=theta"]), tmp_path / "theta")
    old, theta = _train_rows(tmp_path / "old"), _train_rows(tmp_path / "theta")
    assert old[0] == theta[0]
    # eta = 0.001 after one step: the samples move a little, so compare a continuous number.
    assert old[1]["loss/total"] != theta[1]["loss/total"]
