"""FLUX.1 Kontext against the real diffusers code, on a tiny random pipeline (CPU): the velocity
is the transformer called as ``FluxKontextPipeline`` calls it, Euler sampling on our grid is the
pipeline's ``__call__`` for the same noise and source image, and every algorithm trains it."""

from __future__ import annotations

from pathlib import Path

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
from tests.helpers_diffusers import check_exported_lora_velocity  # noqa: E402
from tests.test_diffusers_training import ALGOS, check_one_update  # noqa: E402

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
    policy = make_policy()
    cond = encode_prompts(policy, records(1))
    check_exported_lora_velocity(policy, tiny_pipeline_dir("flux_kontext"), cond, tmp_path)


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_the_tiny_pipeline(algo, tmp_path):
    data = (f"task.path={DATA / 'edits.jsonl'}", f"model.image_root={DATA}")  # the shipped tiny edit set
    check_one_update("flux_kontext", algo, tmp_path, extra=data, prompt=records(1)[0])
