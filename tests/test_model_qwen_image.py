"""The Qwen-Image adapter against diffusers' own ``QwenImagePipeline`` on a tiny random pipeline
(CPU): the transformer as the pipeline calls it, the pipeline's ``__call__`` from the same noise
(with and without its true CFG), its decoded images, its time grid, and one update of every
algorithm through the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402
from tests.helpers_diffusers import check_checkpointing, check_exported_lora  # noqa: E402
from tests.test_diffusers_training import ALGOS, check_one_update  # noqa: E402

SIZE = 16
SEQ = 16
STEPS = 4
# Different token counts, so the padding mask matters.
PROMPTS = ["a red cat", "two white circles next to a black square"]
NEGATIVE = "a painting of a mountain lake"


def make_policy(**extra):
    data = {
        "name": "qwen_image",
        "path": tiny_pipeline_dir("qwen_image"),
        "height": SIZE,
        "width": SIZE,
        "max_sequence_length": SEQ,
        **extra,
    }
    cls = MODELS.get("qwen_image")
    return cls.from_config(from_dict(cls.Config, data), "cpu")


def fresh_pipeline():
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_pipeline_dir("qwen_image"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, noise: torch.Tensor, output_type: str = "latent", **kw) -> torch.Tensor:
    """The pipeline's own sampling from ``noise`` ``(B, C, h, w)``: latents ``(B, C, h, w)``
    (or images with ``output_type="pt"``)."""
    b, c, h, w = noise.shape
    out = pipe(
        PROMPTS[:b],
        latents=pipe._pack_latents(noise, b, c, h, w),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        max_sequence_length=SEQ,
        output_type=output_type,
        **kw,
    ).images
    if output_type != "latent":
        return out
    return pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]


def our_samples(policy, noise: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    cond = policy.encode(PROMPTS[: noise.shape[0]])
    return sample(bind_velocity(policy, cond, guidance_scale), noise, policy.time_grid(STEPS)).x0


def test_velocity_equals_the_transformer_as_the_pipeline_calls_it():
    policy = make_policy(cfg=False)
    pipe = fresh_pipeline()
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = policy.velocity(x, t, policy.encode(PROMPTS))
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
        assert mask is not None and not mask.all()  # the batch is padded: the mask is exercised
        b, c, h, w = x.shape
        tokens = pipe.transformer(
            hidden_states=pipe._pack_latents(x, b, c, h, w),
            timestep=t,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        theirs = pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]
    assert ours.shape == x.shape and ours.dtype == torch.float32 and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # Prompt padding is masked out: the short prompt alone gives the same velocity.
    with torch.no_grad():
        alone = policy.velocity(x[:1], t[:1], policy.encode(PROMPTS[:1]))
    torch.testing.assert_close(alone, ours[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ode_sampling_reproduces_the_pipeline_call(scale):
    """Euler on ``policy.time_grid`` = the pipeline's scheduler loop; with ``scale > 1`` its
    true CFG (two passes, norm-rescaled) with a negative prompt."""
    policy = make_policy(cfg=scale != 1.0, negative_prompt=NEGATIVE)
    pipe = fresh_pipeline()
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    ours = our_samples(policy, noise, scale)
    kw = {"true_cfg_scale": scale, "negative_prompt": NEGATIVE} if scale != 1.0 else {"true_cfg_scale": 1.0}
    theirs = pipeline_call(pipe, noise, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if scale != 1.0:  # guidance must matter for the test to mean anything
        assert (our_samples(policy, noise, 1.0) - ours).abs().max() > 1e-2


def test_decode_matches_the_pipeline_images():
    policy = make_policy(cfg=False)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(5))
    images = policy.decode(our_samples(policy, noise))
    theirs = pipeline_call(fresh_pipeline(), noise, output_type="pt", true_cfg_scale=1.0)
    assert images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(images, theirs, atol=1e-4, rtol=1e-4)
    x = torch.randn(1, *policy.sample_shape, requires_grad=True)
    policy.decode(0.1 * x).mean().backward()
    assert x.grad.abs().sum() > 0


def test_time_grid_is_the_shifted_and_stretched_scheduler_grid():
    """``mu = 0.5 + (0.9 - 0.5) (n - 256) / (8192 - 256)`` for ``n`` tokens, the exponential shift
    ``e^mu / (e^mu + 1/s - 1)`` on ``linspace(1, 1/N, N)``, then stretched so the last sigma is
    ``shift_terminal = 0.02``; then 0."""
    policy = make_policy(cfg=False)
    _, h, w = policy.sample_shape
    mu = 0.5 + (0.9 - 0.5) * ((h // 2) * (w // 2) - 256) / (8192 - 256)
    for steps in (2, 6):
        s = np.linspace(1.0, 1.0 / steps, steps)
        shifted = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
        stretched = 1.0 - (1.0 - shifted) / ((1.0 - shifted[-1]) / (1.0 - 0.02))
        np.testing.assert_allclose(policy.time_grid(steps).numpy(), [*stretched, 0.0], rtol=1e-6, atol=1e-7)


def test_config_checks():
    from advantageflow.configbase import ConfigError

    with pytest.raises(ConfigError, match="<= 1024"):
        from_dict(MODELS.get("qwen_image").Config, {"max_sequence_length": 2048})
    with pytest.raises(ConfigError, match="multiples of 2"):
        make_policy(height=17)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_it(algo, tmp_path):
    check_one_update("qwen_image", algo, tmp_path)


def test_exported_lora_loads_into_the_pipeline(tmp_path):
    """``export_lora`` -> ``QwenImagePipeline.load_lora_weights`` reproduces our samples."""
    policy = make_policy(cfg=False)
    check_exported_lora(
        policy,
        fresh_pipeline,
        lambda pipe, noise: pipeline_call(pipe, noise, true_cfg_scale=1.0),
        lambda noise: our_samples(policy, noise),
        tmp_path,
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    check_checkpointing(make_policy(cfg=False), make_policy(cfg=False, gradient_checkpointing=True), PROMPTS[:1])
