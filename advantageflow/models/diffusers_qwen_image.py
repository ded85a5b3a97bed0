"""Qwen-Image through diffusers, with LoRA (peft) or full fine-tuning.

The state is the VAE latent ``(C, h, w)`` (one frame of ``AutoencoderKLQwenImage``'s video
latent); :meth:`QwenImagePolicy.velocity` packs it into 2x2 patches ``(h/2 * w/2, 4C)`` as
``QwenImagePipeline._pack_latents`` (the same packing as FLUX's).  The transformer is called as
``QwenImagePipeline.__call__`` calls it (diffusers 0.42.1): ``timestep = sigma`` (the pipeline
divides the scheduler's ``1000 sigma`` by 1000), ``img_shapes = [(1, h/2, w/2)]`` per sample,
and the prompt as the last hidden state of Qwen2.5-VL on the pipeline's chat template with its
first 34 tokens (the system prompt) dropped, with a padding mask.  CFG is the pipeline's
"true CFG": two passes and ``v_u + s (v_c - v_u)`` rescaled per packed token to the norm of
``v_c``.  The time grid is the scheduler's, with ``mu`` from the token count (as FLUX.1) and
Qwen-Image's ``shift_terminal`` stretch, computed by the scheduler itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advantageflow.configbase import ConfigError
from advantageflow.models.diffusers_common import (
    DiffusersOptions,
    DiffusersPolicy,
    autocast,
    scheduler_sigmas,
)
from advantageflow.models.diffusers_flux import pack_latents, unpack_latents
from advantageflow.models.tiny_pipelines import TEXT_WIDTH, VOCAB_SIZE, tiny_tokenizer


def renormed_cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG on packed tokens ``(B, N, D)``: ``v_u + s (v_c - v_u)`` rescaled so
    that every token keeps the norm (over ``D``) of ``v_c``."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


class QwenImagePolicy(DiffusersPolicy):
    """Qwen-Image policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, D)`` and ``prompt_embeds_mask``
    ``(B, L)`` (1 for tokens, 0 for padding), and with ``cfg`` the negative prompt's
    (``negative_prompt_embeds`` / ``negative_prompt_embeds_mask``, their own ``L``).  Every
    prompt is padded to the longest prompt cached so far, so batches encoded apart concatenate;
    the padding is masked out, and the mask is dropped when nothing is padded (as the pipeline).
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options (:class:`DiffusersOptions`) plus ``cfg``: encode the negative
        prompt so ``sampler.guidance_scale > 1`` applies the pipeline's true CFG (its
        ``true_cfg_scale``).  ``max_sequence_length`` is the pipeline's 512 (at most 1024)."""

        name: str = "qwen_image"
        path: str = "Qwen/Qwen-Image"
        max_sequence_length: int = 512
        cfg: bool = True

        def validate(self) -> None:
            super().validate()
            if self.max_sequence_length > 1024:
                raise ConfigError("model.max_sequence_length must be <= 1024 for Qwen-Image")

    NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_prompt_embeds_mask")

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        factor = pipe.vae_scale_factor * 2
        self._require_size_multiple(factor)
        h, w = cfg.height // pipe.vae_scale_factor, cfg.width // pipe.vae_scale_factor
        self.sample_shape = (self.transformer.config.in_channels // 4, h, w)
        self._text_len = 0  # the longest cached prompt, in tokens

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.text_device, max_sequence_length=self.cfg.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_embeds_mask": mask}

    def _ensure_cached(self, prompts: list[str]) -> None:
        super()._ensure_cached(prompts)
        for p in prompts:
            self._text_len = max(self._text_len, int(self._prompt_cache[p]["prompt_embeds_mask"].sum()))

    def _stacked(self, prompts: list[str]) -> dict[str, Tensor]:
        """Each prompt's valid tokens (a prefix of its cached row), zero-padded to the longest
        cached prompt, with the mask that marks them."""
        self._ensure_cached(prompts)
        embeds, masks = [], []
        for p in prompts:
            row = self._prompt_cache[p]
            n = int(row["prompt_embeds_mask"].sum())
            e = row["prompt_embeds"][:n]
            embeds.append(torch.cat([e, e.new_zeros(self._text_len - n, e.shape[1])]))
            mask = torch.zeros(self._text_len, dtype=torch.long, device=e.device)
            mask[:n] = 1
            masks.append(mask)
        return {"prompt_embeds": torch.stack(embeds), "prompt_embeds_mask": torch.stack(masks)}

    def _encodes_negative(self) -> bool:
        return self.cfg.cfg

    # ------------------------------------------------------------------ velocity

    def _tokens(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass; the velocity as packed tokens ``(B, h/2 * w/2, 4C)``."""
        _, h, w = self.sample_shape
        mask = cond["prompt_embeds_mask"]
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        # The pipeline hands the transformer (1000 sigma) / 1000; do the same arithmetic.
        timestep = (t.float() * 1000.0) / 1000.0
        with autocast(self.device, self.dtype):
            return self._active(
                hidden_states=pack_latents(x.to(dtype)),
                timestep=timestep,
                guidance=None,
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                return_dict=False,
            )[0]

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        _, h, w = self.sample_shape
        return unpack_latents(self._tokens(x, t, cond), h, w)

    def _guided_velocity(
        self, x: Tensor, t: Tensor, positive: dict[str, Tensor], negative: dict[str, Tensor], scale: float
    ) -> Tensor:
        """The pipeline's true CFG (:func:`renormed_cfg`), conditional and negative passes apart
        (their prompts have different lengths)."""
        _, h, w = self.sample_shape
        v_cond = self._tokens(x, t, positive).float()
        v_uncond = self._tokens(x, t, negative).float()
        return unpack_latents(renormed_cfg(v_cond, v_uncond, scale), h, w)

    # ------------------------------------------------------------------ decoding and time grid

    def decode(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (float32) from latents ``(B, C, h, w)``;
        differentiable.  As the pipeline: one frame, ``x * latents_std + latents_mean``."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=x.device).view(shape)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=x.device).view(shape)
        latents = x.unsqueeze(2) / inv_std + mean
        with autocast(self.device, self.dtype):
            image = vae.decode(latents.to(self.device, vae.dtype), return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0.0, 1.0)

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored: the scheduler's config has its own).

        As ``QwenImagePipeline.__call__``: ``sigmas = linspace(1, 1/steps, steps)``, shifted by
        the scheduler with ``mu = calculate_shift(h/2 * w/2)`` (and stretched to its
        ``shift_terminal``).
        """
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self.pipe.scheduler.config
        _, h, w = self.sample_shape
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return scheduler_sigmas(self.pipe, steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)


def build_tiny_qwen_image(seed: int = 0) -> Any:
    """A tiny ``QwenImagePipeline`` (random weights, float32, CPU) for tests and demos.

    A 2-block ``QwenImageTransformer2DModel`` (4 heads of 8, rotary axes (2, 2, 4)), an
    ``AutoencoderKLQwenImage`` without downsampling (4 latent channels, made-up per-channel
    mean / std so decoding exercises them), a 2-layer Qwen2.5-VL text encoder of width 32 with a
    chat tokenizer whose template prefix is 34 tokens as the real one's, and Qwen-Image's
    scheduler settings (dynamic exponential shift, ``shift_terminal`` 0.02).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1],
        num_res_blocks=1,
        temperal_downsample=[],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": TEXT_WIDTH,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": VOCAB_SIZE,
                "bos_token_id": None,  # Qwen2's tokenizer adds none; the defaults lie outside the tiny vocabulary
                "eos_token_id": None,
                "max_position_embeddings": 2048,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": TEXT_WIDTH,
            },
            vocab_size=VOCAB_SIZE,
            bos_token_id=None,
            eos_token_id=None,
            # image / video ids inside the vocabulary, never produced by the tiny tokenizer
            vision_start_token_id=VOCAB_SIZE - 3,
            vision_end_token_id=VOCAB_SIZE - 2,
            vision_token_id=VOCAB_SIZE - 1,
            image_token_id=VOCAB_SIZE - 1,
            video_token_id=VOCAB_SIZE - 1,
        )
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=None, transformer=transformer
    )
    # The prompt template is the pipeline's own (set in its __init__): train the tokenizer on it.
    pipe.register_modules(tokenizer=tiny_tokenizer(max_length=1100, chat_template=pipe.prompt_template_encode))
    pipe.set_progress_bar_config(disable=True)
    return pipe
