"""``train.optimizer``: AdamW, or bitsandbytes' 8-bit AdamW (its moments stored in 8 bits),
which follows AdamW closely, trains, checkpoints and resumes through the trainer."""

from __future__ import annotations

import pytest
import torch

from advantageflow.config import check_resume_config, load_config
from advantageflow.configbase import ConfigError
from advantageflow.optim import build_optimizer
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

bnb = pytest.importorskip("bitsandbytes")
TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def _descend(optimizer_name: str, steps: int = 20) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """Minimise ``||A p - b||^2`` over an 8192-vector (big enough for 8-bit states)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(8192, generator=gen)
    scale = torch.rand(8192, generator=gen) + 0.5
    p = torch.nn.Parameter(torch.zeros(8192))
    cfg = load_config(TOY, [f"train.optimizer={optimizer_name}", "train.lr=0.01", "train.weight_decay=0.01"])
    opt = build_optimizer([p], cfg.train)
    for _ in range(steps):
        opt.zero_grad()
        ((scale * p - target) ** 2).sum().backward()
        opt.step()
    return p.detach(), opt


def test_8bit_adamw_keeps_8bit_moments_and_follows_adamw():
    p32, _ = _descend("adamw")
    p8, opt = _descend("adamw8bit")
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    moved = p32.norm()
    assert moved > 1.0  # both really moved
    # block-wise quantised moments: 3.8% off AdamW's path after 20 steps here (AdamW at lr x1.5: 46%)
    assert (p8 - p32).norm() / moved < 0.08


def test_config_checks():
    with pytest.raises(ConfigError, match="adamw8bit"):
        load_config(TOY, ["train.optimizer=adam8bit"])
    with pytest.raises(ConfigError, match="cannot step FSDP2"):
        load_config(TOY, ["train.optimizer=adamw8bit", "dist.strategy=fsdp"])


def test_trains_checkpoints_and_resumes_with_8bit_adamw(tmp_path, toy_overrides):
    args = [*toy_overrides, "train.optimizer=adamw8bit", "eval.every=0", "checkpoint.every=2"]
    whole = train(load_config(TOY, [*args, "train.epochs=4"]), tmp_path / "whole")
    train(load_config(TOY, [*args, "train.epochs=2"]), tmp_path / "part")
    train(load_config(TOY, [*args, "train.epochs=4"]), tmp_path / "part", resume=True)
    rows = [[r["loss/total"] for r in read_metrics(tmp_path / w / "metrics.jsonl") if "loss/total" in r]
            for w in ("whole", "part")]
    assert len(rows[0]) == 4 and all(torch.isfinite(torch.tensor(rows[0])))
    assert rows[0] == pytest.approx(rows[1], rel=1e-6, abs=1e-9)  # the 8-bit state survives the checkpoint
    assert whole is not None


def test_resume_accepts_a_checkpoint_from_before_a_key_existed():
    """A run recorded before ``train.optimizer`` existed resumes when the key keeps its default."""
    cfg = load_config(TOY, [])
    recorded = cfg.to_dict()
    del recorded["train"]["optimizer"]
    assert not [c for c in check_resume_config(recorded, cfg, False, "ckpt") if "optimizer" in c]
    changed = load_config(TOY, ["train.optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="train.optimizer"):
        check_resume_config(recorded, changed, False, "ckpt")


def test_resume_fills_keys_added_since_the_checkpoint_with_the_class_defaults():
    """A checkpoint written before ``advantageflow.stratified_times`` existed resumes a config
    that leaves it at the class default (off), although the main job's section turns it on."""
    cfg = load_config(TOY)
    recorded = cfg.to_dict()
    del recorded["advantageflow"]["stratified_times"]
    assert check_resume_config(recorded, cfg, False, "ckpt") == []
