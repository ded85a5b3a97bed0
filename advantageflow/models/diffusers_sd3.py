"""Stable Diffusion 3 / 3.5 through diffusers, with LoRA (peft) or full fine-tuning.

The state is the VAE latent ``(C, H / f, W / f)`` (``f`` the VAE's downsampling factor).
The transformer is called exactly as ``StableDiffusion3Pipeline.__call__`` calls it
(diffusers 0.42.1): ``timestep = sigma * 1000`` with ``sigma = t`` in our convention
(``t = 1`` noise), CFG as one batch ``[negative, positive]`` combined as
``v_u + s (v_c - v_u)``.  The time grid is the scheduler's own: ``FlowMatchEulerDiscreteScheduler``
with ``shift = 3`` for SD3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 5.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advantageflow.models.diffusers_common import (
    DiffusersOptions,
    DiffusersPolicy,
    autocast,
    scheduler_sigmas,
)


class SD3Policy(DiffusersPolicy):
    """SD3 / SD3.5 policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, D)``, ``pooled_prompt_embeds``
    ``(B, P)`` and, when ``cfg`` is on, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds``
    of the same shapes (the negative prompt, ``""`` by default).
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options (:class:`DiffusersOptions`) plus ``cfg``: encode the negative
        prompt so ``sampler.guidance_scale > 1`` applies CFG.  ``max_sequence_length`` is 128
        as in the Flow-GRPO, DiffusionNFT and AWM SD3 scripts (the pipeline's own default: 256).
        """

        name: str = "sd3"
        path: str = "stabilityai/stable-diffusion-3.5-medium"
        max_sequence_length: int = 128
        cfg: bool = True

    NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        factor = pipe.vae_scale_factor * self.transformer.config.patch_size
        self._require_size_multiple(factor)
        self.sample_shape = (
            self.transformer.config.in_channels,
            cfg.height // pipe.vae_scale_factor,
            cfg.width // pipe.vae_scale_factor,
        )

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def _encodes_negative(self) -> bool:
        return self.cfg.cfg

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass: ``timestep = 1000 t`` as in the pipeline."""
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        with autocast(self.device, self.dtype):
            return self._active(
                hidden_states=x.to(dtype),
                timestep=t.float() * 1000.0,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                return_dict=False,
            )[0]

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored: the scheduler's config has its own).

        As ``StableDiffusion3Pipeline.__call__``: ``set_timesteps(steps)``, plus ``mu`` from the
        latent's token count when the scheduler uses dynamic shifting.
        """
        kwargs: dict[str, Any] = {"num_inference_steps": steps}
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.transformer.config.patch_size
            seq_len = (self.sample_shape[1] // patch) * (self.sample_shape[2] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return scheduler_sigmas(self.pipe, steps, **kwargs)
