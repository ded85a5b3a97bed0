"""Wan text-to-video against the real diffusers code, on a tiny random pipeline (CPU): the velocity
is the transformer as ``WanPipeline`` calls it, Euler sampling on our grid is the pipeline's
``__call__`` (with CFG) for the same noise, decoding is its ``output_type="pt"`` video, an image
reward scores a video as the mean over its frames, and every algorithm trains it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import ConfigError, from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402
from tests.helpers_diffusers import check_exported_lora_velocity  # noqa: E402
from tests.test_diffusers_training import ALGOS, check_one_update  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
FRAMES = 5
SEQ = 16
STEPS = 3
PROMPTS = ["a red cat on a chair", "two white circles"]


def make_cfg(**extra):
    data = {
        "name": "wan",
        "path": tiny_pipeline_dir("wan"),
        "height": SIZE,
        "width": SIZE,
        "num_frames": FRAMES,
        "max_sequence_length": SEQ,
        **extra,
    }
    return from_dict(MODELS.get("wan").Config, data)


def make_policy(**extra):
    return MODELS.get("wan").from_config(make_cfg(**extra), "cpu")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir("wan"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, noise, scale, output_type="latent", **kw):
    return pipe(
        PROMPTS[: noise.shape[0]],
        latents=noise,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=scale,
        max_sequence_length=SEQ,
        output_type=output_type,
        **kw,
    ).frames


def test_state_has_a_frame_axis_and_velocity_equals_the_transformer(pipe):
    policy = make_policy()
    assert policy.sample_shape == (4, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = policy.velocity(x, t, policy.encode(PROMPTS))
        embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=SEQ)
        theirs = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds, return_dict=False)[
            0
        ]
    assert ours.shape == x.shape and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_ode_sampling_reproduces_the_pipeline_call(pipe, scale):
    policy = make_policy(negative_prompt="a black square")
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    ours = sample(bind_velocity(policy, policy.encode(PROMPTS), scale), noise, policy.time_grid(STEPS)).x0
    theirs = pipeline_call(pipe, noise, scale, negative_prompt="a black square")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if scale != 1.0:
        plain = sample(bind_velocity(policy, policy.encode(PROMPTS), 1.0), noise, policy.time_grid(STEPS)).x0
        assert (plain - ours).abs().max() > 1e-2  # guidance matters


def test_wan22_per_token_timesteps_reproduce_the_pipeline_call():
    """``expand_timesteps`` (Wan2.2-TI2V-5B): the transformer gets one timestep per token."""
    from diffusers import WanPipeline

    def ti2v():
        pipe = WanPipeline.from_pretrained(tiny_pipeline_dir("wan"))
        pipe.register_to_config(expand_timesteps=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    policy = MODELS.get("wan")(make_cfg(cfg=False), ti2v(), "cpu")
    noise = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(4))
    ours = sample(bind_velocity(policy, policy.encode(PROMPTS[:1]), 1.0), noise, policy.time_grid(STEPS)).x0
    torch.testing.assert_close(ours, pipeline_call(ti2v(), noise, 1.0), atol=1e-4, rtol=1e-4)


def test_decode_gives_the_pipeline_video_and_is_differentiable(pipe):
    policy = make_policy(cfg=False)
    noise = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(3))
    latents = sample(bind_velocity(policy, policy.encode(PROMPTS[:1]), 1.0), noise, policy.time_grid(STEPS)).x0
    video = policy.decode(latents)
    assert video.shape == (1, FRAMES, 3, SIZE, SIZE) and 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(video, pipeline_call(pipe, noise, 1.0, output_type="pt"), atol=1e-4, rtol=1e-4)
    x = latents.clone().requires_grad_(True)
    policy.decode(x).mean().backward()
    assert x.grad.abs().sum() > 0


def test_time_grid_of_wans_hub_scheduler_ends_at_zero():
    """The hub configs' ``UniPCMultistepScheduler`` (flow sigmas, ``flow_shift`` 3): its sigmas."""
    from diffusers import UniPCMultistepScheduler

    policy = make_policy()
    policy.pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        final_sigmas_type="zero",
    )
    grid = policy.time_grid(8)
    assert grid.shape == (9,) and grid[0] > 0.99 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    s = np.linspace(1.0, 1.0 / 1000, 9)[:-1]
    np.testing.assert_allclose(grid[:-1].numpy(), 3.0 * s / (1 + 2.0 * s), rtol=1e-5)


def test_an_image_reward_scores_a_video_as_its_frame_mean():
    from advantageflow.rewards.base import CompositeReward

    seen = {}

    def brightness(images, prompts, metadata):
        seen.update(shape=tuple(images.shape), prompts=list(prompts))
        return images.mean(dim=(1, 2, 3))

    class WholeVideo:
        scores_video = True

        def __call__(self, videos, prompts, metadata):
            return videos.flatten(1).amax(dim=1)

    videos = torch.rand(2, 3, 3, 4, 4)
    result = CompositeReward({"b": brightness, "v": WholeVideo()}, {"b": 1.0, "v": 0.0})(videos, ["p", "q"], [{}, {}])
    assert seen == {"shape": (6, 3, 4, 4), "prompts": ["p", "p", "p", "q", "q", "q"]}
    torch.testing.assert_close(result.components["b"], videos.mean(dim=(2, 3, 4)).mean(dim=1))
    torch.testing.assert_close(result.components["v"], videos.flatten(1).amax(dim=1))


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="num_frames must be 4k"):
        make_cfg(num_frames=6)
    with pytest.raises(ConfigError, match="multiples of 16"):
        make_policy(height=40)


def test_two_expert_wan22_is_refused(pipe):
    import copy

    two = copy.copy(pipe)
    two.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ConfigError, match="two-expert"):
        MODELS.get("wan")(make_cfg(), two, "cpu")


def test_exported_lora_loads_into_the_pipeline(tmp_path):
    """Our checkpoint's adapter, through diffusers' own ``load_lora_weights``, gives our velocity."""
    policy = make_policy()
    check_exported_lora_velocity(policy, tiny_pipeline_dir("wan"), policy.encode(PROMPTS[:1]), tmp_path)


# ---------------------------------------------------------------------------- training


class MeanBrightness:
    """Differentiable test reward: mean pixel value ``(B,)`` of images (so DRaFT can train too)."""

    differentiable = True

    def __call__(self, images, prompts, metadata):
        assert images.dim() == 4  # frames, never whole videos
        return images.float().mean(dim=(1, 2, 3))


from advantageflow.rewards import REWARDS  # noqa: E402

REWARDS.register("test_wan_frames_brightness", MeanBrightness)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_the_tiny_pipeline(algo, tmp_path):
    frames_reward = "reward.name=test_wan_frames_brightness"  # asserts it sees frames, never whole videos
    check_one_update("wan", algo, tmp_path, extra=("model.height=32", "model.width=32", frames_reward))


def test_videos_are_drawn_as_film_strips(tmp_path):
    from advantageflow.runlog import filmstrip, save_samples

    videos = torch.rand(2, 5, 3, 4, 6)
    strip = filmstrip(videos)  # frames 0, 1, 3, 4 side by side
    assert strip.shape == (2, 3, 4, 24)
    for slot, frame in enumerate([0, 1, 3, 4]):
        torch.testing.assert_close(strip[..., slot * 6 : (slot + 1) * 6], videos[:, frame])
    assert save_samples(videos, tmp_path / "grid.png").stat().st_size > 0
