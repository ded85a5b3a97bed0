"""Tiny, randomly initialised diffusers pipelines for tests and demos (offline): SD3 and FLUX.1
here, the others (Qwen-Image, SANA, FLUX.1 Kontext, Wan, FLUX.2) beside their adapters, listed in :data:`BUILDERS`.

Every component is built from a small config with the real diffusers / transformers classes,
so a saved folder loads through the same ``from_pretrained`` path as a real checkpoint::

    python -m advantageflow.models.tiny_pipelines sd3 /tmp/tiny-sd3
    python -m advantageflow.models.tiny_pipelines flux /tmp/tiny-flux

Sizes (see ``shared/docs/NOTES.md``): 2-layer transformers with 32-wide attention, a VAE
with one 8-channel block (no downsampling: latents are image-sized, 4 channels), CLIP/T5
text encoders of width 32 and 2 layers, and one BPE tokenizer trained in-process on a few
words with the ``tokenizers`` library, serving every tokenizer slot.  A folder is ~2 MB.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

# Words the tokenizers are trained on; prompts made of them tokenize into few pieces.
VOCAB_TEXT = [
    "a photo of a red cat sitting on a blue chair",
    "a green dog and a yellow bird in the park",
    "an image of two white circles next to a black square",
    "a painting of a mountain lake at sunset with orange clouds",
    "the word hello written on a sign in large letters",
    "one purple triangle above three small pink stars",
]
TEXT_WIDTH = 32
VOCAB_SIZE = 1000


def tiny_tokenizer(max_length: int = 77, chat_template: str = "") -> Any:
    """A BPE ``PreTrainedTokenizerFast`` (bos/eos/pad/unk set) trained on :data:`VOCAB_TEXT`.

    With ``chat_template`` (a Qwen-style ``<|im_start|>...{}...`` prompt template) it is a chat
    tokenizer as Qwen2's: also trained on the template, ``<|im_start|>`` / ``<|im_end|>`` and
    newlines are tokens, and no bos/eos is added, so the template's prefix has as many tokens as
    with the real tokenizer (Qwen-Image drops a fixed count of them).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    chat = ["<|im_start|>", "<|im_end|>"] if chat_template else []
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Whitespace() is this split without the newline alternative.
    words = r"\w+|[^\w\s]+|\n" if chat_template else r"\w+|[^\w\s]+"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="removed", invert=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400 if chat_template else 200,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", *chat],
        show_progress=False,
    )
    tok.train_from_iterator(VOCAB_TEXT + ([chat_template.format("")] if chat_template else []), trainer=trainer)
    if not chat_template:
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _clip_config(tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_ids_config(tokenizer: Any) -> dict[str, int]:
    """The vocabulary size and special-token ids a tiny text model needs to match ``tokenizer``."""
    return {
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_t5_encoder(tokenizer: Any, umt5: bool = False) -> Any:
    """A 2-layer T5 (or UMT5, Wan's) encoder of width :data:`TEXT_WIDTH` over ``tokenizer``'s ids."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = config_cls(
        vocab_size=VOCAB_SIZE,
        d_model=TEXT_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_cls(cfg)


def _tiny_vae(scaling_factor: float, shift_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def build_tiny_sd3(seed: int = 0) -> Any:
    """A tiny ``StableDiffusion3Pipeline`` (random weights, float32, CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=32,
    )
    # SD3's own VAE factors, so decode's scaling/shift is exercised.
    vae = _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, True))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, True))
    text_encoder_3 = tiny_t5_encoder(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux(seed: int = 0) -> Any:
    """A tiny ``FluxPipeline`` (guidance-distilled transformer, dynamic shifting), float32, CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's VAE factors
    text_encoder = CLIPTextModel(_clip_config(tokenizer, False))
    text_encoder_2 = tiny_t5_encoder(tokenizer)
    # FLUX.1-dev's scheduler config: resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: kind -> builder ``(seed) -> pipeline``, or the ``"module:function"`` of one that lives beside
#: its model adapter (imported only when that kind is built).
BUILDERS: dict[str, Any] = {
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "qwen_image": "advantageflow.models.diffusers_qwen_image:build_tiny_qwen_image",
    "sana": "advantageflow.models.diffusers_sana:build_tiny_sana",
    "flux_kontext": "advantageflow.models.diffusers_flux_kontext:build_tiny_pipeline",
    "wan": "advantageflow.models.diffusers_wan:build_tiny_pipeline",
    "flux2": "advantageflow.models.diffusers_flux2:build_tiny_pipeline",
}


def build_tiny_pipeline(kind: str, seed: int = 0) -> Any:
    """The tiny pipeline ``kind`` (a key of :data:`BUILDERS`), built in memory."""
    from advantageflow.registry import import_dotted

    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline '{kind}' (choose from {sorted(BUILDERS)})")
    builder = BUILDERS[kind]
    return (import_dotted(builder) if isinstance(builder, str) else builder)(seed)


def save_tiny_pipeline(kind: str, out_dir: str, seed: int = 0) -> str:
    """Build the tiny pipeline ``kind`` (a key of :data:`BUILDERS`) and ``save_pretrained`` it."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline '{kind}' (choose from {sorted(BUILDERS)})")
    with torch.random.fork_rng(devices=[]):  # building seeds torch: leave the caller's RNG as it was
        build_tiny_pipeline(kind, seed).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m advantageflow.models.tiny_pipelines",
        description="Save a tiny random diffusers pipeline for tests and demos.",
    )
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_tiny_pipeline(args.kind, args.out_dir, args.seed)
    print(f"saved a tiny {args.kind} pipeline to {args.out_dir}")


_SAVED: dict[tuple[str, int], str] = {}


def tiny_pipeline_dir(kind: str, seed: int = 0) -> str:
    """A folder holding the tiny pipeline ``kind``, built once per process (for tests)."""
    import tempfile

    key = (kind, seed)
    if key in _SAVED:
        return _SAVED[key]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # transformers saves on rank 0 only once a process group exists: rank 0 builds the
        # folder for the node (one folder per torchrun run), the others wait for it.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
        folder = os.path.join(tempfile.gettempdir(), f"af-tiny-{kind}-{seed}-{run_id}")
        if dist.get_rank() == 0 and not os.path.isdir(folder):
            save_tiny_pipeline(kind, folder, seed)
        dist.barrier()
        _SAVED[key] = folder
    else:
        _SAVED[key] = save_tiny_pipeline(kind, tempfile.mkdtemp(prefix=f"af-tiny-{kind}-"), seed)
    return _SAVED[key]


if __name__ == "__main__":
    main()
