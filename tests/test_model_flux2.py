"""FLUX.2 against the real diffusers code, on a tiny random pipeline (CPU): the velocity is the
transformer as ``Flux2Pipeline`` calls it, Euler sampling on our grid is the pipeline's ``__call__``
for the same noise, decoding is its ``output_type="pt"`` image, and every algorithm trains it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
SEQ = 16
STEPS = 3
PROMPTS = ["a red cat on a chair", "two white circles"]


def make_policy(**extra):
    data = {
        "name": "flux2",
        "path": tiny_pipeline_dir("flux2"),
        "height": SIZE,
        "width": SIZE,
        "max_sequence_length": SEQ,
        **extra,
    }
    return MODELS.get("flux2").from_config(from_dict(MODELS.get("flux2").Config, data), "cpu")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(tiny_pipeline_dir("flux2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, noise, guidance, output_type="latent"):
    out = pipe(
        prompt=PROMPTS[: noise.shape[0]],
        latents=noise,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=SEQ,
        output_type=output_type,
    ).images
    return out.permute(0, 2, 1).reshape(noise.shape) if output_type == "latent" else out


def ours(policy, noise):
    return sample(
        bind_velocity(policy, policy.encode(PROMPTS[: noise.shape[0]]), 1.0), noise, policy.time_grid(STEPS)
    ).x0


def test_velocity_equals_the_transformer_as_the_pipeline_calls_it(pipe):
    policy = make_policy()
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v = policy.velocity(x, t, policy.encode(PROMPTS))
        embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
        latents, latent_ids = pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, torch.device("cpu"), None, x)
        tokens = pipe.transformer(
            hidden_states=latents,
            timestep=t,
            guidance=torch.full((2,), 4.0),
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=latent_ids,
            return_dict=False,
        )[0]
        theirs = pipe._unpack_latents_with_ids(tokens, latent_ids)
    assert v.shape == x.shape and v.abs().max() > 0.1
    torch.testing.assert_close(v, theirs, atol=1e-5, rtol=1e-5)


def test_ode_sampling_and_decode_reproduce_the_pipeline_call(pipe):
    policy = make_policy()
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    x0 = ours(policy, noise)
    torch.testing.assert_close(x0, pipeline_call(pipe, noise, 4.0), atol=1e-4, rtol=1e-4)
    assert (x0 - pipeline_call(pipe, noise, 1.5)).abs().max() > 1e-3  # the guidance value matters
    images = policy.decode(x0)
    assert images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(images, pipeline_call(pipe, noise, 4.0, output_type="pt"), atol=1e-4, rtol=1e-4)


def test_time_grid_uses_the_empirical_mu():
    """``mu`` from FLUX.2's two-line fit in the token count and the number of steps,
    ``s' = e^mu / (e^mu + 1/s - 1)`` on ``linspace(1, 1/N, N)``."""
    policy = make_policy()
    _, h, w = policy.sample_shape
    n = h * w
    for steps in (2, 8):
        m200, m10 = 0.00016927 * n + 0.45666666, 8.73809524e-05 * n + 1.89833333
        mu = m200 + (steps - 200) * (m200 - m10) / 190.0
        base = np.linspace(1.0, 1.0 / steps, steps)
        expected = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base] + [0.0]
        np.testing.assert_allclose(policy.time_grid(steps).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_cfg_is_refused_with_one_line():
    policy = make_policy()
    x = torch.zeros(1, *policy.sample_shape)
    with pytest.raises(ValueError, match="distilled guidance"):
        policy.velocity(x, torch.tensor([0.5]), policy.encode(PROMPTS[:1]), guidance_scale=3.0)


def test_exported_lora_loads_into_the_pipeline(tmp_path):
    """Our checkpoint's adapter, through diffusers' own ``load_lora_weights``, gives our velocity."""
    from advantageflow.models.export import export_lora

    policy = make_policy()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    export_lora(policy, str(tmp_path))
    fresh = type(policy.pipe).from_pretrained(tiny_pipeline_dir("flux2"))
    fresh.load_lora_weights(str(tmp_path))
    x = torch.randn(1, *policy.sample_shape, generator=gen)
    t = torch.tensor([0.6])
    cond = policy.encode(PROMPTS[:1])
    with torch.no_grad():
        ours = policy.velocity(x, t, cond)
        with policy.reference():
            base = policy.velocity(x, t, cond)
        policy.set_trained_forward(fresh.transformer)  # the loaded pipeline's network in our call
        theirs = policy.velocity(x, t, cond)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- training


class MeanBrightness:
    """Differentiable test reward: mean pixel value ``(B,)`` (so DRaFT can train too)."""

    differentiable = True

    def __call__(self, images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))


ALGO_OVERRIDES = {"awm": ["awm.num_timesteps=1"], "epg": ["epg.num_draws=1"], "flow_grpo": ["flow_grpo.beta=0.04"]}
ALGOS = ["advantageflow", "awm", "flow_grpo", "diffusion_nft", "epg", "ram", "draft"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_the_tiny_pipeline(algo, tmp_path):
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.checkpoint import latest_checkpoint, load_checkpoint
    from advantageflow.config import load_config
    from advantageflow.rewards import REWARDS
    from advantageflow.trainer import train

    if algo not in ALGORITHMS:
        pytest.skip(f"{algo} is not registered")
    if "test_flux2_brightness" not in REWARDS:
        REWARDS.register("test_flux2_brightness", MeanBrightness)
    cfg = load_config(
        str(REPO / "configs/flux2_tiny_advantageflow.yaml"),
        [
            f"algo={algo}",
            "model.height=16",
            "model.width=16",
            "model.max_sequence_length=8",
            "model.lora.rank=2",
            "model.lora.alpha=4",
            "reward.name=test_flux2_brightness",
            "sampler.steps=2",
            "sampler.eval_steps=2",
            "train.epochs=1",
            "train.prompts_per_epoch=1",
            "train.group_size=2",
            "train.micro_batch_size=2",
            "train.lr=0.01",
            "eval.every=0",
            "checkpoint.every=1",
            *ALGO_OVERRIDES.get(algo, []),
        ],
    )
    result = train(cfg, tmp_path / "run")
    assert result.steps == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if "loss/total" in r]
    assert losses and np.isfinite(losses).all()
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints")).policy
    assert sum(float(v.abs().sum()) for k, v in state.items() if "lora_B" in k) > 0, f"{algo} did not train"
