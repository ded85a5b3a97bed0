"""Wan 2.1 / 2.2 text-to-video through diffusers, with LoRA (peft) or full fine-tuning.

The state is the video VAE's latent ``(C, F', H/s, W/s)``: a frame axis ``F' = (F - 1) / r + 1``
for ``F`` pixel frames (``r`` the VAE's temporal factor, 4; ``s`` its spatial factor, 8 for
Wan 2.1 and 16 for Wan 2.2's TI2V-5B VAE).  The transformer is called as ``WanPipeline.__call__``
calls it (diffusers 0.42.1): ``timestep = 1000 t`` with ``t`` the scheduler's sigma, one value per
sample, or per token when the pipeline's ``expand_timesteps`` is set (Wan 2.2 TI2V-5B); CFG with
the negative prompt as ``v_u + s (v_c - v_u)`` (the pipeline's two passes, here one batch).  The
time grid is the scheduler's own sigmas for ``set_timesteps(steps)`` (Wan's hub configs:
``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift``; its timesteps are rounded to
integers, ours are ``1000 t`` exactly; our solvers, not UniPC, step on that grid).  Two-expert
Wan 2.2 (A14B: ``transformer_2`` / ``boundary_ratio``) is refused.

Decoding gives videos ``(B, F, 3, H, W)`` in ``[0, 1]`` (the pipeline's ``output_type="pt"``);
an image reward scores a video as the mean of its per-frame scores
(:class:`~advantageflow.rewards.base.CompositeReward`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from advantageflow.configbase import ConfigError
from advantageflow.models.diffusers_common import (
    DEFAULT_LORA_TARGETS,
    DiffusersOptions,
    DiffusersPolicy,
    LoraOptions,
    autocast,
    scheduler_sigmas,
)

#: Wan's attention projections: self-attention ``attn1`` and text cross-attention ``attn2``.
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class WanPolicy(DiffusersPolicy):
    """Wan text-to-video policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, D)`` (UMT5, zero-padded after each
    prompt's tokens as the pipeline does) and, when ``cfg`` is on, ``negative_prompt_embeds``.
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options plus ``num_frames`` (pixel frames, ``4k + 1``) and ``cfg`` (encode
        the negative prompt so ``sampler.guidance_scale > 1`` applies CFG; Wan's own scale is 5).
        LoRA targets every attention projection (``attn1`` and ``attn2``)."""

        name: str = "wan"
        path: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        height: int = 480
        width: int = 832
        num_frames: int = 33
        cfg: bool = True
        lora: LoraOptions = field(default_factory=lambda: LoraOptions(target_modules=list(WAN_LORA_TARGETS)))

        def __post_init__(self) -> None:
            # A `lora:` section without target_modules carries the joint-block default, which
            # names no Wan module: it means Wan's own targets.
            if self.lora.target_modules == DEFAULT_LORA_TARGETS:
                self.lora.target_modules = list(WAN_LORA_TARGETS)

        def validate(self) -> None:
            super().validate()
            if self.num_frames < 1 or (self.num_frames - 1) % 4:
                raise ConfigError("model.num_frames must be 4k + 1 (1, 5, 9, ..., 81): Wan's VAE packs 4 frames")

    NEGATIVE_KEYS = ("negative_prompt_embeds",)

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise ConfigError(
                "two-expert Wan 2.2 (transformer_2, boundary_ratio) is not supported; use Wan 2.1 or Wan2.2-TI2V-5B"
            )
        super().__init__(cfg, pipe, device)
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        _, ph, pw = self.transformer.config.patch_size
        if cfg.height % (spatial * ph) or cfg.width % (spatial * pw):
            raise ConfigError(f"model.height and model.width must be multiples of {spatial * ph} for this pipeline")
        if (cfg.num_frames - 1) % temporal:
            raise ConfigError(f"model.num_frames must be {temporal}k + 1 for this pipeline's VAE")
        self.sample_shape = (
            self.transformer.config.in_channels,
            (cfg.num_frames - 1) // temporal + 1,
            cfg.height // spatial,
            cfg.width // spatial,
        )

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import WanPipeline

        return WanPipeline

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        prompt_embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length,
            device=self.text_device,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype)}

    def _encodes_negative(self) -> bool:
        return self.cfg.cfg

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass ``(B, C, F', h, w) -> (B, C, F', h, w)``: ``timestep = 1000 t``,
        per token under ``expand_timesteps`` as the pipeline."""
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        timestep = t.float() * 1000.0
        if self.pipe.config.get("expand_timesteps", False):
            _, pt, ph, pw = (1, *self.transformer.config.patch_size)
            _, f, h, w = self.sample_shape
            timestep = timestep[:, None].expand(-1, (f // pt) * (h // ph) * (w // pw))
        with autocast(self.device, self.dtype):
            return self._active(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                return_dict=False,
            )[0]

    def decode(self, x: Tensor) -> Tensor:
        """Videos ``(B, F, 3, H, W)`` in ``[0, 1]`` (float32) from latents ``(B, C, F', h, w)``;
        differentiable.  ``vae.decode(x * std + mean)`` per channel, as the pipeline."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=self.device, dtype=torch.float32).view(shape)
        std = torch.tensor(vae.config.latents_std, device=self.device, dtype=torch.float32).view(shape)
        latents = x.float() * std + mean
        with autocast(self.device, self.dtype):
            video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0.0, 1.0)

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``set_timesteps(steps)``, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored: the scheduler has its own)."""
        return scheduler_sigmas(self.pipe, steps, num_inference_steps=steps)


def build_tiny_pipeline(seed: int = 0) -> Any:
    """A tiny ``WanPipeline``: a 2-layer ``WanTransformer3DModel`` (2 heads of 12, patch
    (1, 2, 2)), an ``AutoencoderKLWan`` of width 8 with 4 latent channels (spatial factor 8,
    temporal 4), a 2-layer UMT5 encoder of width 32 and the tiny BPE tokenizer;
    ``FlowMatchEulerDiscreteScheduler(shift=3)`` so the pipeline's own loop is Euler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from advantageflow.models.tiny_pipelines import TEXT_WIDTH, tiny_t5_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, umt5=True)
    z_dim = 4
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 2.0, 0.8, 1.2],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
