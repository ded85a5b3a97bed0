"""FLUX.1 Kontext against the real diffusers code, on a tiny random pipeline (CPU): the velocity
is the transformer called as ``FluxKontextPipeline`` calls it, Euler sampling on our grid is the
pipeline's ``__call__`` for the same noise and source image, and every algorithm trains it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.configbase import from_dict  # noqa: E402
from advantageflow.models import MODELS  # noqa: E402
from advantageflow.models.tiny_pipelines import tiny_pipeline_dir  # noqa: E402
from advantageflow.rollouts import encode_prompts  # noqa: E402
from advantageflow.sampling import bind_velocity, sample  # noqa: E402
from advantageflow.tasks.base import Prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "advantageflow/assets/edits/shapes"
SIZE = 16
SEQ = 16
STEPS = 3
TEXTS = ["make it blue", "add a white circle"]
SOURCES = ["red_circle.png", "blue_square.png"]


def make_policy(**extra):
    data = {
        "name": "flux_kontext",
        "path": tiny_pipeline_dir("flux_kontext"),
        "height": SIZE,
        "width": SIZE,
        "max_sequence_length": SEQ,
        "image_root": str(DATA),
        **extra,
    }
    return MODELS.get("flux_kontext").from_config(from_dict(MODELS.get("flux_kontext").Config, data), "cpu")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_pipeline_dir("flux_kontext"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def records(n: int = 2) -> list[Prompt]:
    return [Prompt(TEXTS[i], {"image": SOURCES[i]}) for i in range(n)]


def source_pixels(pipe, i: int) -> torch.Tensor:
    """Source image ``i`` as the pipeline's step 3 makes it, ``(1, 3, SIZE, SIZE)``."""
    from PIL import Image

    img = Image.open(DATA / SOURCES[i]).convert("RGB")
    proc = pipe.image_processor
    return proc.preprocess(proc.resize(img, SIZE, SIZE), SIZE, SIZE)


def test_velocity_equals_the_transformer_as_the_pipeline_calls_it(pipe):
    policy = make_policy()
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = policy.velocity(x, t, encode_prompts(policy, records()))
        b, c, h, w = x.shape
        embeds, pooled, text_ids = pipe.encode_prompt(TEXTS, None, max_sequence_length=SEQ)
        image = torch.cat([source_pixels(pipe, 0), source_pixels(pipe, 1)])
        latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
            image, b, c, SIZE, SIZE, torch.float32, torch.device("cpu"), None, pipe._pack_latents(x, b, c, h, w)
        )
        tokens = pipe.transformer(
            hidden_states=torch.cat([latents, image_latents], dim=1),
            timestep=t,
            guidance=torch.full((b,), policy.cfg.guidance),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([latent_ids, image_ids]),
            return_dict=False,
        )[0][:, : latents.shape[1]]
        theirs = pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)
    assert ours.shape == x.shape and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # The source image matters: swapping the two records' images changes the velocity.
    swapped = [Prompt(TEXTS[0], {"image": SOURCES[1]}), Prompt(TEXTS[1], {"image": SOURCES[0]})]
    with torch.no_grad():
        other = policy.velocity(x, t, encode_prompts(policy, swapped))
    assert (other - ours).abs().max() > 1e-3


@pytest.mark.parametrize("true_cfg", [False, True])
def test_ode_sampling_reproduces_the_pipeline_call(pipe, true_cfg):
    from PIL import Image

    extra = {"true_cfg": True, "negative_prompt": "a black square"} if true_cfg else {}
    policy = make_policy(**extra)
    noise = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    scale = 2.0 if true_cfg else 1.0
    cond = encode_prompts(policy, records(1))
    ours = sample(bind_velocity(policy, cond, scale), noise, policy.time_grid(STEPS)).x0
    b, c, h, w = noise.shape
    kw = {"true_cfg_scale": scale, "negative_prompt": "a black square"} if true_cfg else {}
    out = pipe(
        image=pipe.image_processor.resize(Image.open(DATA / SOURCES[0]).convert("RGB"), SIZE, SIZE),
        prompt=TEXTS[:1],
        latents=pipe._pack_latents(noise, b, c, h, w),
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        num_inference_steps=STEPS,
        guidance_scale=policy.cfg.guidance,
        max_sequence_length=SEQ,
        output_type="latent",
        **kw,
    ).images
    theirs = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_prompt_without_a_source_image_is_refused():
    policy = make_policy()
    with pytest.raises(ValueError, match="no source image.*model.image_key"):
        policy.encode(["make it blue"])
    with pytest.raises(ValueError, match="cannot read the source image"):
        policy.encode([Prompt("make it blue", {"image": "missing.png"})])


def test_exported_lora_loads_into_the_pipeline(tmp_path):
    """Our checkpoint's adapter, through diffusers' own ``load_lora_weights``, gives our velocity."""
    from advantageflow.models.export import export_lora

    policy = make_policy()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    export_lora(policy, str(tmp_path))
    fresh = type(policy.pipe).from_pretrained(tiny_pipeline_dir("flux_kontext"))
    fresh.load_lora_weights(str(tmp_path))
    x = torch.randn(1, *policy.sample_shape, generator=gen)
    t = torch.tensor([0.6])
    cond = encode_prompts(policy, records(1))
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
    if "test_kontext_brightness" not in REWARDS:
        REWARDS.register("test_kontext_brightness", MeanBrightness)
    cfg = load_config(
        str(REPO / "configs/flux_kontext_tiny_advantageflow.yaml"),
        [
            f"algo={algo}",
            f"task.path={DATA / 'edits.jsonl'}",
            f"model.image_root={DATA}",
            "model.height=16",
            "model.width=16",
            "model.max_sequence_length=8",
            "model.lora.rank=2",
            "model.lora.alpha=4",
            "reward.name=test_kontext_brightness",
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
