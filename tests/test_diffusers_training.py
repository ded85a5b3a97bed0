"""A few training steps of every algorithm on the tiny SD3 and FLUX pipelines (CPU), through
the real trainer, plus one shipped tiny config through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.algorithms import ALGORITHMS  # noqa: E402
from advantageflow.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from advantageflow.config import load_config  # noqa: E402
from advantageflow.models.export import load_policy  # noqa: E402
from advantageflow.rewards import REWARDS  # noqa: E402
from advantageflow.rollouts import encode_prompts  # noqa: E402
from advantageflow.tasks.base import Prompt  # noqa: E402
from advantageflow.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waits on a shared machine
    (measured 1.2 s instead of 11 s for one training run under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MeanBrightness:
    """Differentiable test reward: mean pixel value ``(B,)`` (so DRaFT can train too)."""

    differentiable = True

    def __call__(self, images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))


REWARDS.register("test_mean_brightness", MeanBrightness)

# Per-algorithm overrides that keep the run to one cheap update on a 2-step grid.
ALGO_OVERRIDES = {
    "awm": ["awm.num_timesteps=1"],
    "epg": ["epg.num_draws=1"],
    "flow_grpo": ["flow_grpo.beta=0.04"],
}
ALGOS = [a for a in ("advantageflow", "awm", "flow_grpo", "diffusion_nft", "epg", "ram", "draft")
         if a in ALGORITHMS]


def tiny_overrides(kind: str, algo: str) -> list[str]:
    return [
        f"algo={algo}",
        f"model.path=tiny:{kind}",
        "model.height=16",
        "model.width=16",
        "model.max_sequence_length=8",
        "model.lora.rank=2",
        "model.lora.alpha=4",
        "reward.name=test_mean_brightness",
        "sampler.steps=2",
        "sampler.eval_steps=2",
        "train.epochs=1",
        "train.prompts_per_epoch=1",
        "train.group_size=2",
        "train.micro_batch_size=2",
        "train.lr=0.01",
        "eval.every=0",
        "checkpoint.every=1",
        "log.tensorboard=false",
        "log.progress=false",
        *ALGO_OVERRIDES.get(algo, []),
    ]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_trains_the_tiny_pipeline(kind, algo, tmp_path):
    check_one_update(kind, algo, tmp_path)


def check_one_update(
    kind: str, algo: str, tmp_path: Path, extra: tuple[str, ...] = (), prompt: Prompt | None = None
) -> None:
    """One update of ``algo`` on the tiny ``kind`` pipeline through the trainer (the model's
    ``configs/<kind>_tiny_advantageflow.yaml``, ``algo=`` switched, then ``extra`` overrides):
    finite losses, moved LoRA weights, and a checkpoint whose policy differs from the base
    model at ``prompt`` (default "a red cat"; an editing model's record carries its image)."""
    cfg = load_config(str(REPO / f"configs/{kind}_tiny_advantageflow.yaml"), [*tiny_overrides(kind, algo), *extra])
    result = train(cfg, tmp_path / "run")
    assert result.steps == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if "loss/total" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)

    # LoRA's B matrices start at zero: after one update some must have moved, and the
    # checkpoint must rebuild a policy whose velocity differs from the base model's.
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints")).policy
    b_norm = sum(float(v.abs().sum()) for k, v in state.items() if "lora_B" in k)
    assert b_norm > 0, f"{algo} did not update the LoRA weights"
    policy = load_policy(cfg.model, state)
    x = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7])
    cond = encode_prompts(policy, [prompt or Prompt("a red cat")])
    with torch.no_grad():
        v = policy.velocity(x, t, cond)
        with policy.reference():
            v_ref = policy.velocity(x, t, cond)
    assert (v - v_ref).abs().max() > 0


def test_shipped_tiny_config_trains_through_the_cli(tmp_path):
    from advantageflow.cli import main

    run_dir = tmp_path / "cli-run"
    main([
        "train", str(REPO / "configs/flux_tiny_advantageflow.yaml"),
        "model.height=16", "model.width=16", "sampler.steps=2", "sampler.eval_steps=2",
        "train.epochs=1", "eval.num_prompts=1", "eval.samples_per_prompt=2", "eval.every=1",
        "--run-dir", str(run_dir),
    ])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1
    assert (run_dir / "checkpoints").is_dir()
