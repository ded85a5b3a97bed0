"""The SANA adapter against diffusers' own ``SanaPipeline`` on a tiny random pipeline (CPU): the
transformer as the pipeline calls it, the pipeline's ``__call__`` from the same noise (its
DPM-Solver++(2M) with integer timesteps, with and without CFG, and Euler with float timesteps),
its decoded images, its time grid, and one update of every algorithm through the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import ConfigError, from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402
from tests.helpers_diffusers import check_checkpointing, check_exported_lora  # noqa: E402
from tests.test_diffusers_training import ALGOS, check_one_update  # noqa: E402

SIZE = 32  # SanaPipeline wants multiples of 32 pixels
SEQ = 16
STEPS = 4
PROMPTS = ["a red cat", "two white circles next to a black square"]
NEGATIVE = "a painting of a mountain lake"


def make_cfg(**extra):
    data = {"name": "sana", "path": tiny_pipeline_dir("sana"), "height": SIZE, "width": SIZE}
    return from_dict(MODELS.get("sana").Config, {**data, "max_sequence_length": SEQ, **extra})


def make_policy(pipe=None, **extra):
    cls = MODELS.get("sana")
    return cls(make_cfg(**extra), pipe, "cpu") if pipe is not None else cls.from_config(make_cfg(**extra), "cpu")


def fresh_pipeline(euler: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny_pipeline_dir("sana"))
    if euler:  # float timesteps, plain Euler steps
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, noise: torch.Tensor, output_type: str = "latent", **kw) -> torch.Tensor:
    return pipe(
        PROMPTS[: noise.shape[0]],
        latents=noise,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        max_sequence_length=SEQ,
        use_resolution_binning=False,
        output_type=output_type,
        **kw,
    ).images


def our_samples(policy, noise: torch.Tensor, guidance_scale: float = 1.0, solver: str = "dpmpp_2m"):
    cond = policy.encode(PROMPTS[: noise.shape[0]])
    velocity = bind_velocity(policy, cond, guidance_scale)
    return sample(velocity, noise, policy.time_grid(STEPS), solver=solver).x0


def test_velocity_equals_the_transformer_as_the_pipeline_calls_it():
    from advantageflow.models.diffusers_sana import pipeline_instruction

    policy = make_policy(cfg=False)
    pipe = fresh_pipeline()
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3037])  # 303.7 -> 303: the scheduler's integer timesteps
    with torch.no_grad():
        ours = policy.velocity(x, t, policy.encode(PROMPTS))
        embeds, mask, _, _ = pipe.encode_prompt(
            PROMPTS,
            do_classifier_free_guidance=False,
            max_sequence_length=SEQ,
            complex_human_instruction=pipeline_instruction(),
        )
        theirs = pipe.transformer(
            x,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=torch.tensor([900, 303]) * pipe.transformer.config.timestep_scale,
            return_dict=False,
        )[0]
    assert ours.shape == x.shape and ours.dtype == torch.float32 and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_dpm_solver_sampling_reproduces_the_pipeline_call(scale):
    """``sampler.solver: dpmpp_2m`` on ``policy.time_grid`` = the pipeline's DPMSolverMultistep
    loop; with ``scale > 1`` its CFG with a negative prompt (encoded without the instruction)."""
    policy = make_policy(cfg=scale != 1.0, negative_prompt=NEGATIVE)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    ours = our_samples(policy, noise, scale)
    theirs = pipeline_call(fresh_pipeline(), noise, guidance_scale=scale, negative_prompt=NEGATIVE)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if scale != 1.0:  # guidance must matter for the test to mean anything
        assert (our_samples(policy, noise, 1.0) - ours).abs().max() > 1e-2


def test_euler_sampling_reproduces_the_pipeline_call_with_a_flow_match_scheduler():
    pipe = fresh_pipeline(euler=True)
    policy = make_policy(pipe, cfg=False)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(3))
    ours = our_samples(policy, noise, solver="euler")
    torch.testing.assert_close(
        ours, pipeline_call(fresh_pipeline(euler=True), noise, guidance_scale=1.0), atol=1e-4, rtol=1e-4
    )


def test_decode_matches_the_pipeline_images():
    policy = make_policy(cfg=False)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(5))
    images = policy.decode(our_samples(policy, noise))
    theirs = pipeline_call(fresh_pipeline(), noise, output_type="pt", guidance_scale=1.0)
    assert images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(images, theirs, atol=1e-4, rtol=1e-4)
    x = torch.randn(1, *policy.sample_shape, requires_grad=True)
    policy.decode(0.1 * x).mean().backward()
    assert x.grad.abs().sum() > 0


def test_time_grid_is_the_flow_shifted_scheduler_grid():
    """DPMSolverMultistep's flow sigmas: ``s = 1 - linspace(1, 1/1000, N + 1)``, shifted by
    ``3 s / (1 + 2 s)``, reversed, without the last; then 0."""
    policy = make_policy(cfg=False)
    for steps in (2, 6):
        s = 1.0 - np.linspace(1.0, 1.0 / 1000, steps + 1)
        expected = np.flip(3.0 * s / (1.0 + 2.0 * s))[:-1]
        np.testing.assert_allclose(policy.time_grid(steps).numpy(), [*expected, 0.0], rtol=1e-6, atol=1e-7)


def test_lora_targets_default_to_sana_attention_and_survive_partial_overrides():
    from advantageflow.models.diffusers_sana import SANA_LORA_TARGETS

    assert make_cfg(lora={"rank": 2}).lora.target_modules == SANA_LORA_TARGETS
    policy = make_policy(cfg=False, lora={"rank": 2})
    names = {n.rsplit(".lora_", 1)[0] for n, _ in policy.trainable_named_parameters()}
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    with pytest.raises(ConfigError, match="multiples of 2"):
        make_policy(height=33)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_it(algo, tmp_path):
    check_one_update("sana", algo, tmp_path)


def test_exported_lora_loads_into_the_pipeline(tmp_path):
    """``export_lora`` -> ``SanaPipeline.load_lora_weights`` reproduces our samples."""
    policy = make_policy(cfg=False)
    check_exported_lora(
        policy,
        fresh_pipeline,
        lambda pipe, noise: pipeline_call(pipe, noise, guidance_scale=1.0),
        lambda noise: our_samples(policy, noise),
        tmp_path,
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    check_checkpointing(make_policy(cfg=False), make_policy(cfg=False, gradient_checkpointing=True), PROMPTS[:1])
