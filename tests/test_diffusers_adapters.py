"""The SD3 and FLUX adapters against the real diffusers code, on tiny random pipelines (CPU).

Every comparison is with diffusers doing the work itself: the transformer called directly,
the pipeline's own ``__call__`` with the same initial latents, and a fresh pipeline that loads
our exported LoRA with ``load_lora_weights``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import ConfigError, from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.export import export_lora, export_transformer, load_policy  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402

SIZE = 16
SEQ = 16
STEPS = 4
PROMPTS = ["a red cat on a chair", "two white circles"]
KINDS = ["sd3", "flux"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waits on a shared machine
    (measured 1.2 s instead of 11 s for one training run under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(kind: str, **extra):
    data = {"name": kind, "path": tiny_pipeline_dir(kind), "height": SIZE, "width": SIZE}
    data["max_sequence_length"] = SEQ
    data.update(extra)
    return from_dict(MODELS.get(kind).Config, data)


def make_policy(kind: str, **extra):
    return MODELS.get(kind).from_config(make_cfg(kind, **extra), "cpu")


def fresh_pipeline(kind: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(tiny_pipeline_dir(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_lora(policy, seed: int = 0, scale: float = 0.2) -> None:
    """Give the LoRA weights random values so the adapter changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def pipeline_latents(kind: str, pipe, noise: torch.Tensor, guidance_scale: float, **kw) -> torch.Tensor:
    """The pipeline's own sampling from ``noise`` ``(B, C, h, w)``; returns ``(B, C, h, w)``."""
    b, c, h, w = noise.shape
    latents = noise if kind == "sd3" else pipe._pack_latents(noise, b, c, h, w)
    out = pipe(
        PROMPTS[:b],
        latents=latents,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        max_sequence_length=SEQ,
        output_type="latent",
        **kw,
    ).images
    return out if kind == "sd3" else pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)


def adapter_samples(policy, noise: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    cond = policy.encode(PROMPTS[: noise.shape[0]])
    return sample(bind_velocity(policy, cond, guidance_scale), noise, policy.time_grid(STEPS)).x0


def raw_transformer_velocity(kind: str, pipe, x: torch.Tensor, t: torch.Tensor, guidance: float):
    """diffusers' transformer called directly, as its pipeline calls it."""
    b, c, h, w = x.shape
    with torch.no_grad():
        if kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS[:b], None, None, do_classifier_free_guidance=False, max_sequence_length=SEQ
            )
            return pipe.transformer(
                hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                pooled_projections=pooled, return_dict=False,
            )[0]
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS[:b], None, max_sequence_length=SEQ)
        tokens = pipe.transformer(
            hidden_states=pipe._pack_latents(x, b, c, h, w),
            timestep=t,
            guidance=torch.full((b,), guidance),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_equals_the_transformer_output(kind):
    policy = make_policy(kind)
    pipe = fresh_pipeline(kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *policy.sample_shape, generator=gen)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = policy.velocity(x, t, policy.encode(PROMPTS))
    theirs = raw_transformer_velocity(kind, pipe, x, t, guidance=policy.cfg.guidance if kind == "flux" else 0)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "scale"), [("sd3", 1.0), ("sd3", 4.5), ("flux", 1.0)])
def test_ode_sampling_reproduces_the_pipeline_call(kind, scale):
    """Our Euler sampling on ``policy.time_grid`` = the pipeline's scheduler loop (CFG included)."""
    policy = make_policy(kind)
    pipe = fresh_pipeline(kind)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    ours = adapter_samples(policy, noise, scale)
    theirs = pipeline_latents(kind, pipe, noise, guidance_scale=scale if kind == "sd3" else 3.5)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    if kind == "sd3" and scale != 1.0:  # guidance must matter for the test to mean anything
        plain = adapter_samples(policy, noise, 1.0)
        assert (plain - ours).abs().max() > 1e-2


def test_flux_true_cfg_reproduces_the_pipeline_call():
    policy = make_policy("flux", true_cfg=True, negative_prompt="a black square")
    pipe = fresh_pipeline("flux")
    noise = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(3))
    ours = adapter_samples(policy, noise, 2.0)
    theirs = pipeline_latents("flux", pipe, noise, 3.5, true_cfg_scale=2.0, negative_prompt="a black square")
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_flux_rejects_cfg_without_negative_prompt():
    policy = make_policy("flux")
    x = torch.zeros(1, *policy.sample_shape)
    with pytest.raises(ValueError, match="distilled guidance"):
        policy.velocity(x, torch.tensor([0.5]), policy.encode(PROMPTS[:1]), guidance_scale=3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_lora_reproduces_samples_and_reference_reproduces_base(kind, tmp_path):
    policy = make_policy(kind)
    perturb_lora(policy)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(4))
    ours = adapter_samples(policy, noise)
    with policy.reference():
        ours_ref = adapter_samples(policy, noise)
    assert (ours - ours_ref).abs().max() > 1e-2  # the adapter matters

    export_lora(policy, str(tmp_path))
    pipe = fresh_pipeline(kind)
    base = pipeline_latents(kind, pipe, noise, 1.0 if kind == "sd3" else 3.5)
    torch.testing.assert_close(ours_ref, base, atol=2e-5, rtol=1e-4)
    pipe.load_lora_weights(str(tmp_path))
    tuned = pipeline_latents(kind, pipe, noise, 1.0 if kind == "sd3" else 3.5)
    torch.testing.assert_close(ours, tuned, atol=2e-5, rtol=1e-4)


def test_decode_matches_the_pipeline_images():
    policy = make_policy("sd3")
    pipe = fresh_pipeline("sd3")
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(5))
    latents = adapter_samples(policy, noise)
    images = policy.decode(latents)
    out = pipe(
        PROMPTS, latents=noise, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        guidance_scale=1.0, max_sequence_length=SEQ, output_type="pt",
    ).images
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_differentiable(kind):
    policy = make_policy(kind)
    x = torch.randn(1, *policy.sample_shape, requires_grad=True)
    policy.decode(x * 0.1).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sd3_time_grid_is_the_shifted_scheduler_grid():
    """diffusers' SD3 grid: ``shift(linspace(1, s_min, N))`` then 0, with ``s_min = shift(1/1000)``."""
    policy = make_policy("sd3")

    def shift(s):
        return 3.0 * s / (1.0 + 2.0 * s)

    for steps in (1, 4, 10):
        expected = [shift(s) for s in np.linspace(1.0, shift(1e-3), steps)] + [0.0]
        grid = policy.time_grid(steps)
        assert grid.shape == (steps + 1,)
        np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_flux_time_grid_uses_the_resolution_dependent_shift():
    """FLUX: ``mu = 0.5 + (1.15 - 0.5) (n - 256) / (4096 - 256)`` for ``n`` tokens,
    ``s' = e^mu / (e^mu + 1/s - 1)`` on ``linspace(1, 1/N, N)``."""
    policy = make_policy("flux")
    _, h, w = policy.sample_shape
    n = (h // 2) * (w // 2)
    mu = 0.5 + (1.15 - 0.5) * (n - 256) / (4096 - 256)
    for steps in (2, 8):
        base = np.linspace(1.0, 1.0 / steps, steps)
        expected = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base] + [0.0]
        np.testing.assert_allclose(policy.time_grid(steps).numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_the_lora_weights(kind):
    policy = make_policy(kind)
    named = policy.trainable_named_parameters()
    assert named and all("lora_" in n for n, _ in named)
    n_lora = sum(p.numel() for _, p in named)
    assert n_lora < sum(p.numel() for p in policy.transformer.parameters())
    x = torch.randn(2, *policy.sample_shape)
    cond = policy.encode(PROMPTS)
    with torch.no_grad(), policy.reference():
        policy.velocity(x, torch.tensor([0.5, 0.5]), cond)
    assert all(p.requires_grad for _, p in named)  # reference() gives them back
    policy.velocity(x, torch.tensor([0.5, 0.7]), cond).pow(2).mean().backward()
    grads = {n: p.grad for n, p in policy.transformer.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in named}
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_snapshot_swaps_lora_weights_in_place():
    policy = make_policy("sd3")
    x = torch.randn(1, *policy.sample_shape)
    t = torch.tensor([0.6])
    cond = policy.encode(PROMPTS[:1])
    snap = policy.snapshot()
    with torch.no_grad():
        v0 = policy.velocity(x, t, cond)
        perturb_lora(policy)
        v1 = policy.velocity(x, t, cond)
        with policy.use_parameters(snap):
            torch.testing.assert_close(policy.velocity(x, t, cond), v0)
    assert (v1 - v0).abs().max() > 1e-3
    torch.testing.assert_close(policy.velocity(x, t, cond).detach(), v1)


def test_full_finetuning_uses_a_frozen_copy_as_reference(tmp_path):
    policy = make_policy("sd3", lora={"enabled": False})
    named = policy.trainable_named_parameters()
    assert len(named) == len(list(policy.transformer.parameters()))
    x = torch.randn(1, *policy.sample_shape)
    t = torch.tensor([0.4])
    cond = policy.encode(PROMPTS[:1])
    with torch.no_grad():
        for _, p in named:
            p.add_(0.05 * torch.randn_like(p))
        v = policy.velocity(x, t, cond)
        with policy.reference():
            v_ref = policy.velocity(x, t, cond)
    base = raw_transformer_velocity("sd3", fresh_pipeline("sd3"), x, t, 0.0)
    torch.testing.assert_close(v_ref, base, atol=1e-5, rtol=1e-5)
    assert (v - v_ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no LoRA"):
        export_lora(policy, str(tmp_path / "lora"))


def test_trainable_state_round_trip_and_merged_export(tmp_path):
    from diffusers import SD3Transformer2DModel

    policy = make_policy("sd3")
    perturb_lora(policy, seed=7)
    path = tmp_path / "state.pt"
    torch.save({"policy": policy.trainable_state()}, path)
    loaded = load_policy(policy.cfg, str(path))
    x = torch.randn(1, *policy.sample_shape)
    t = torch.tensor([0.8])
    cond = policy.encode(PROMPTS[:1])
    with torch.no_grad():
        v = policy.velocity(x, t, cond)
        torch.testing.assert_close(loaded.velocity(x, t, loaded.encode(PROMPTS[:1])), v)
        export_transformer(policy, str(tmp_path / "merged"))
        merged = SD3Transformer2DModel.from_pretrained(str(tmp_path / "merged" / "transformer"))
        out = merged(
            hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False,
        )[0]
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)


def test_prompt_cache_and_text_encoder_release():
    policy = make_policy("sd3", release_text_encoders=True)
    first = policy.encode(["a red cat"])
    assert policy.pipe.text_encoder is not None  # encode() alone never releases
    policy.cache_prompts(["two white circles"])
    assert policy.pipe.text_encoder is None and policy.pipe.text_encoder_3 is None
    again = policy.encode(["two white circles", "a red cat"])
    torch.testing.assert_close(again["prompt_embeds"][1], first["prompt_embeds"][0])
    assert again["negative_prompt_embeds"].shape == again["prompt_embeds"].shape
    with pytest.raises(RuntimeError, match="not cached"):
        policy.encode(["a green dog"])


def test_config_errors_are_one_line():
    cls = MODELS.get("sd3")
    with pytest.raises(ConfigError, match="lora.rank"):
        from_dict(cls.Config, {"name": "sd3", "lora": {"rank": 0}}, "model")
    with pytest.raises(ConfigError, match="multiples of 2"):
        make_policy("sd3", height=17)
    with pytest.raises(ConfigError, match="is not a folder"):
        MODELS.get("flux").from_config(make_cfg("flux", path="/nonexistent/flux"), "cpu")


def test_corrupt_model_folder_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load"):
        MODELS.get("sd3").from_config(make_cfg("sd3", path=str(tmp_path)), "cpu")


def test_memory_per_process_reports_gib():
    from advantageflow.models.base import memory_per_process

    mem = memory_per_process("cpu")
    assert 0.01 < mem["perf/max_memory_gb"] < 64


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    plain = make_policy(kind)
    ckpt = make_policy(kind, gradient_checkpointing=True)
    perturb_lora(plain, seed=3)
    ckpt.load_trainable_state(plain.trainable_state())
    x = torch.randn(2, *plain.sample_shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.5, 0.8])
    grads = []
    for policy in (plain, ckpt):
        policy.velocity(x, t, policy.encode(PROMPTS)).pow(2).mean().backward()
        grads.append([p.grad for p in policy.trainable_parameters()])
    assert ckpt.transformer.gradient_checkpointing
    assert any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_building_a_tiny_pipeline_leaves_the_global_rng_alone(tmp_path):
    """Models initialised after loading (LoRA) must not depend on whether this process built
    the tiny pipeline first (under torchrun only process 0 builds it)."""
    from advantageflow.models.tiny_pipelines import save_tiny_pipeline

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_pipeline("sd3", str(tmp_path / "p"), seed=7)
    assert torch.equal(torch.rand(3), expected)
