"""FLUX.2 against the real diffusers code, on a tiny random pipeline (CPU): the velocity is the
transformer as ``Flux2Pipeline`` calls it, Euler sampling on our grid is the pipeline's ``__call__``
for the same noise, decoding is its ``output_type="pt"`` image, and every algorithm trains it."""

from __future__ import annotations

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
from tests.helpers_diffusers import check_exported_lora_velocity  # noqa: E402
from tests.test_diffusers_training import ALGOS, check_one_update  # noqa: E402

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
    policy = make_policy()
    check_exported_lora_velocity(policy, tiny_pipeline_dir("flux2"), policy.encode(PROMPTS[:1]), tmp_path)


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_the_tiny_pipeline(algo, tmp_path):
    check_one_update("flux2", algo, tmp_path)
