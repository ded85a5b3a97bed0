"""Every algorithm raises the 2-D reward end to end, from its shipped config, through the one
trainer: switching algorithm is changing ``algo:`` (and its section), nothing else."""

from __future__ import annotations

import pytest

from advantageflow.config import ConfigError, load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

# name -> (epochs, minimum gain of eval/reward_mean).  The shipped configs run 30 epochs; the
# tests run a shorter, seeded prefix of the same run.
RUNS = {
    "advantageflow": (12, 0.15),
    "awm": (12, 0.15),
    "flow_grpo": (12, 0.08),
    "diffusion_nft": (12, 0.15),
    "epg": (12, 0.15),
    "ram": (12, 0.06),
    "draft": (12, 0.04),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_algorithm_raises_toy_reward_from_its_config(name, tmp_path, toy_overrides):
    epochs, gain = RUNS[name]
    cfg = load_config(str(REPO / "configs" / f"toy2d_{name}.yaml"), toy_overrides + [
        f"train.epochs={epochs}", f"eval.every={epochs}", "eval.samples_per_prompt=512",
        f"checkpoint.every={epochs}",
    ])
    assert cfg.algo == name
    result = train(cfg, tmp_path / name)
    before, after = result.eval_before["eval/reward_mean"], result.eval_after["eval/reward_mean"]
    print(f"{name}: eval/reward_mean {before:.3f} -> {after:.3f}")
    assert after > before + gain, (name, before, after)


def test_draft_refuses_a_non_differentiable_reward_before_training(tmp_path, toy_overrides):
    cfg = load_config(str(REPO / "configs" / "toy2d_draft.yaml"), toy_overrides + [
        "reward.name=toy2d_modes", "reward.args={modes: [0, 1, 2]}", "train.epochs=1", "eval.every=0",
    ])
    with pytest.raises(ConfigError, match="'reward.name': algo 'draft' .* reward 'toy2d_modes' is not differentiable"):
        train(cfg, tmp_path / "run")


def test_shipped_configs_differ_only_in_the_algorithm_and_what_it_needs():
    """The seven configs share the task, model and training budget; EPG asks for raw
    advantages (no std), DRaFT for a differentiable reward, AWM/NFT for one step per epoch."""
    dicts = {n: load_config(str(REPO / "configs" / f"toy2d_{n}.yaml")).to_dict() for n in RUNS}
    base = dicts["advantageflow"]
    for name, d in dicts.items():
        assert d["algo"] == name and name in d
        for key in ("model", "task", "eval"):
            assert d[key] == base[key], (name, key)
        assert d["train"]["epochs"] == base["train"]["epochs"]
    assert dicts["epg"]["advantage"]["std"] == "none"
    assert dicts["draft"]["reward"]["name"] == "toy2d_smooth"
    assert dicts["awm"]["train"]["steps_per_epoch"] == dicts["diffusion_nft"]["train"]["steps_per_epoch"] == 1


@pytest.mark.parametrize("name", list(RUNS))
def test_switching_algo_on_the_command_line_trains(name, tmp_path, toy_overrides):
    """``advantageflow train configs/toy2d_advantageflow.yaml algo=NAME`` runs every algorithm
    with its defaults (DRaFT with the differentiable reward)."""
    from advantageflow.cli import main

    extra = ["reward.name=toy2d_smooth"] if name == "draft" else []
    run_dir = tmp_path / "run"
    main(["train", str(REPO / "configs" / "toy2d_advantageflow.yaml"), f"algo={name}", *toy_overrides, *extra,
          "train.epochs=1", "eval.every=0", "--run-dir", str(run_dir)])
    assert load_config(str(run_dir / "config.yaml")).algo == name
    assert (run_dir / "summary.json").exists()


def _train_rows(run_dir) -> list[dict]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    keep = ("reward/", "loss/", "stats/")
    return [{k: v for k, v in r.items() if k.startswith(keep) or k in ("step", "epoch")}
            for r in rows if "reward/mean" in r]


@pytest.mark.parametrize("name,extra", [
    ("awm", ["awm.num_timesteps=2"]),  # the lagged EMA copy (DiffusionNFT's old policy is the same class)
    ("flow_grpo", ["flow_grpo.fast_window=2", "flow_grpo.fast_window_range=[0, 5]"]),  # the Fast window
    ("diffusion_nft", ["train.steps_per_epoch=2"]),  # the old policy, moved once per epoch, samples
])
def test_resumed_run_equals_uninterrupted_run(name, extra, tmp_path, toy_overrides):
    """The algorithm's state (old / EMA policies, the Fast window) survives a checkpoint."""
    config = str(REPO / "configs" / f"toy2d_{name}.yaml")
    base = toy_overrides + extra + ["eval.every=0", "checkpoint.every=2", "checkpoint.keep=5"]
    train(load_config(config, base + ["train.epochs=3"]), tmp_path / "full")
    train(load_config(config, base + ["train.epochs=2"]), tmp_path / "resumed")
    train(load_config(config, base + ["train.epochs=3"]), tmp_path / "resumed", resume=True)
    full, resumed = _train_rows(tmp_path / "full"), _train_rows(tmp_path / "resumed")
    assert len(full) == 3 and full == resumed
