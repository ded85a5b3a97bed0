"""FLUX.1 through diffusers, with LoRA (peft) or full fine-tuning.

The state is presented as the VAE latent ``(C, h, w)``; :meth:`FluxPolicy.velocity` packs it
into FLUX's sequence of 2x2 patches ``(h/2 * w/2, 4C)`` and unpacks the result, exactly as
``FluxPipeline._pack_latents`` / ``_unpack_latents`` (diffusers 0.42.1).  The transformer is
called as ``FluxPipeline.__call__`` calls it: ``timestep = sigma`` (the pipeline divides the
scheduler's ``1000 sigma`` by 1000; the transformer multiplies by 1000 inside), the distilled
guidance value as ``guidance`` (FLUX.1-dev: 3.5), and optional "true" CFG with a negative prompt.
The time grid is the scheduler's, with the resolution-dependent shift
``mu = calculate_shift(h/2 * w/2)`` and ``sigma' = e^mu / (e^mu + 1/sigma - 1)``
(Black Forest Labs, FLUX.1; diffusers ``FlowMatchEulerDiscreteScheduler.time_shift``).
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


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, h, w) -> (B, h/2 * w/2, 4C)``: 2x2 patches in row-major order, channels first."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``(B, h/2 * w/2, 4C) -> (B, C, h, w)``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids ``(h/2 * w/2, 3)`` of the packed tokens: ``(0, row, col)``."""
    rows = torch.arange(h // 2, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxPolicy(DiffusersPolicy):
    """FLUX.1 policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, D)`` (T5), ``pooled_prompt_embeds``
    ``(B, P)`` (CLIP), and with ``true_cfg`` the negative prompt's of the same shapes.
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options (:class:`DiffusersOptions`) plus ``guidance``: the distilled
        guidance value fed to guidance-embedding models (FLUX.1-dev 3.5), and ``true_cfg``:
        encode the negative prompt so ``sampler.guidance_scale > 1`` applies real CFG."""

        name: str = "flux"
        path: str = "black-forest-labs/FLUX.1-dev"
        guidance: float = 3.5
        true_cfg: bool = False

        def validate(self) -> None:
            super().validate()
            if self.guidance < 0:
                raise ConfigError("model.guidance must be >= 0")

    NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        factor = pipe.vae_scale_factor * 2
        self._require_size_multiple(factor)
        h, w = cfg.height // pipe.vae_scale_factor, cfg.width // pipe.vae_scale_factor
        self.sample_shape = (self.transformer.config.in_channels // 4, h, w)
        self._img_ids = image_ids(h, w, self.device, self.dtype)

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.text_device,
            max_sequence_length=self.cfg.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def _encodes_negative(self) -> bool:
        return self.cfg.true_cfg

    def _no_cfg_message(self) -> str:
        return (
            "FLUX uses the distilled guidance model.guidance; set sampler.guidance_scale=1, "
            "or model.true_cfg=true for real CFG with a negative prompt"
        )

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass on the packed latents; returns the unpacked velocity."""
        _, h, w = self.sample_shape
        n = x.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.cfg.guidance, device=x.device, dtype=torch.float32)
        prompt_embeds = cond["prompt_embeds"]
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=x.device, dtype=dtype)
        # The pipeline hands the transformer (1000 sigma) / 1000 in float32; do the same arithmetic.
        timestep = (t.float() * 1000.0) / 1000.0
        hidden, ids = self._image_tokens(x.to(dtype), cond, dtype)
        with autocast(self.device, self.dtype):
            tokens = self._active(
                hidden_states=hidden,
                timestep=timestep,
                guidance=guidance,
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                encoder_hidden_states=prompt_embeds.to(dtype),
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
        # Only the first (h/2 * w/2) tokens are the state's (Kontext appends its source image's).
        return unpack_latents(tokens[:, : (h // 2) * (w // 2)], h, w)

    def _image_tokens(self, x: Tensor, cond: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The transformer's image sequence ``(B, N, 4C)`` and its rotary ids ``(N, 3)``: the
        packed state (a subclass may append conditioning tokens)."""
        return pack_latents(x), self._img_ids.to(dtype)

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored: the scheduler's config has its own).

        As ``FluxPipeline.__call__``: ``sigmas = linspace(1, 1/steps, steps)`` shifted by the
        scheduler with ``mu = calculate_shift(h/2 * w/2)``.
        """
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        _, h, w = self.sample_shape
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            return scheduler_sigmas(self.pipe, steps, num_inference_steps=steps, mu=mu)
        return scheduler_sigmas(self.pipe, steps, sigmas=sigmas, mu=mu)
