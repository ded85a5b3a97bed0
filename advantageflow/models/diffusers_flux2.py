"""FLUX.2 text-to-image through diffusers, with LoRA (peft) or full fine-tuning.

The state is the latent ``Flux2Pipeline`` denoises: the VAE latent patchified 2x2 into channels
and normalised by the VAE's batch-norm statistics, ``(4C, H/2f, W/2f)`` (``C`` = 32 latent
channels, ``f`` the VAE factor, 8).  :meth:`Flux2Policy.velocity` flattens it into tokens
``(h w, 4C)`` row by row with rotary ids ``(0, row, col, 0)``, and the text tokens get
``(0, 0, 0, l)``, as ``Flux2Pipeline.prepare_latents`` / ``_prepare_text_ids`` (diffusers 0.42.1).
The transformer is called as ``Flux2Pipeline.__call__`` calls it: ``timestep = sigma`` (the
pipeline divides the scheduler's ``1000 sigma`` by 1000; the transformer multiplies by 1000),
``guidance = model.guidance`` (guidance-distilled FLUX.2 [dev]: 4; no CFG).  The prompt is
encoded by the pipeline's ``encode_prompt`` (the chat-formatted prompt through Mistral Small 3.1,
hidden states of layers 10, 20 and 30 side by side).  The time grid is the scheduler's for
``sigmas = linspace(1, 1/N, N)`` with ``mu = compute_empirical_mu(h w, N)`` (FLUX.2's shift
depends on the token count *and* the number of steps).  Decoding undoes the normalisation and
the patchifying, then ``vae.decode``.
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


def token_ids(h: int, w: int, device: torch.device) -> Tensor:
    """Rotary ids ``(h w, 4)`` of the state's tokens: ``(0, row, col, 0)``, row-major."""
    rows = torch.arange(h)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w)[None, :].expand(h, w).reshape(-1)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1).to(device)


class Flux2Policy(DiffusersPolicy):
    """FLUX.2 policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, 3 D)``.
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options plus ``guidance``: the distilled guidance value the transformer
        embeds (the pipeline's default, 4).  ``max_sequence_length`` 512 as the pipeline."""

        name: str = "flux2"
        path: str = "black-forest-labs/FLUX.2-dev"
        guidance: float = 4.0

        def validate(self) -> None:
            super().validate()
            if self.guidance < 0:
                raise ConfigError("model.guidance must be >= 0")

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        factor = pipe.vae_scale_factor * 2
        self._require_size_multiple(factor)
        h, w = cfg.height // factor, cfg.width // factor
        self.sample_shape = (self.transformer.config.in_channels, h, w)
        self._img_ids = token_ids(h, w, self.device)

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        prompt_embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.text_device, max_sequence_length=self.cfg.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype)}

    def _no_cfg_message(self) -> str:
        return "FLUX.2 uses the distilled guidance model.guidance; set sampler.guidance_scale=1"

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass on the state's tokens; returns the velocity ``(B, 4C, h, w)``."""
        b, c, h, w = x.shape
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        prompt_embeds = cond["prompt_embeds"]
        length = prompt_embeds.shape[1]
        txt_ids = torch.zeros(length, 4, dtype=torch.long, device=x.device)
        txt_ids[:, 3] = torch.arange(length, device=x.device)
        guidance = torch.full((b,), self.cfg.guidance, device=x.device, dtype=torch.float32)
        timestep = (t.float() * 1000.0) / 1000.0  # the pipeline's arithmetic
        with autocast(self.device, self.dtype):
            tokens = self._active(
                hidden_states=x.to(dtype).reshape(b, c, h * w).permute(0, 2, 1),
                timestep=timestep,
                guidance=guidance,
                encoder_hidden_states=prompt_embeds.to(dtype),
                txt_ids=txt_ids,
                img_ids=self._img_ids,
                return_dict=False,
            )[0]
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)

    def decode(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (float32) from states ``(B, 4C, h, w)``;
        differentiable.  As the pipeline: ``x * sqrt(var + eps) + mean`` with the VAE's
        batch-norm statistics, un-patchify 2x2, ``vae.decode``."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        latents = self.pipe._unpatchify_latents(x.float() * std + mean)
        with autocast(self.device, self.dtype):
            image = vae.decode(latents.to(self.device, vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0.0, 1.0)

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored): ``linspace(1, 1/N, N)`` shifted with
        ``mu = compute_empirical_mu(h w, N)``, as ``Flux2Pipeline.__call__``."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        _, h, w = self.sample_shape
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return scheduler_sigmas(self.pipe, steps, num_inference_steps=steps, mu=mu)
        return scheduler_sigmas(self.pipe, steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)


#: The tiny tokenizer's chat template: the user's text only (Mistral's template would put the
#: long system message first, which a 16-token test sequence cannot hold).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def build_tiny_pipeline(seed: int = 0) -> Any:
    """A tiny ``Flux2Pipeline``: a ``Flux2Transformer2DModel`` with one double and one single
    block (4 heads of 8, guidance embedding, rotary axes (2, 2, 2, 2)); an ``AutoencoderKLFlux2``
    with one 8-channel block (no downsampling, 4 latent channels, batch-norm statistics set away
    from 0 / 1 so decoding exercises them); a ``Mistral3ForConditionalGeneration`` whose language
    model has 30 layers of width 16 (the pipeline reads hidden layers 10, 20, 30; its one-layer
    Pixtral vision tower is unused for text prompts) and the tiny BPE tokenizer with
    :data:`TINY_CHAT_TEMPLATE`."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from advantageflow.models.tiny_pipelines import VOCAB_SIZE, tiny_tokenizer, token_ids_config

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    width = 16
    text = MistralConfig(
        **token_ids_config(tokenizer),
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
    )
    vision = PixtralVisionConfig(  # present as in Mistral Small 3.1; text prompts never reach it
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=16,
    )
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(vision_config=vision, text_config=text, image_token_index=VOCAB_SIZE - 1, spatial_merge_size=2)
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=3 * width,
        timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 2, 2),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
