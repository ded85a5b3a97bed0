"""SANA through diffusers, with LoRA (peft) or full fine-tuning.

The state is the DC-AE latent ``(C, H / f, W / f)`` (``f = 32`` for SANA's ``AutoencoderDC``).
The transformer is called as ``SanaPipeline.__call__`` calls it (diffusers 0.42.1):
``timestep = t_sched * timestep_scale`` where ``t_sched`` is the scheduler's timestep for
``sigma = t``, i.e. ``1000 t`` -- truncated to an integer when the scheduler hands out integer
timesteps, as SANA's ``DPMSolverMultistepScheduler`` does -- with the Gemma-2 prompt
embeddings and their attention mask; CFG as one batch ``[negative, positive]`` combined as
``v_u + s (v_c - v_u)``.  Prompts are prefixed with the pipeline's default "complex human
instruction" (the negative prompt is not, as in the pipeline).  The time grid is the scheduler's
own: flow sigmas ``shift s / (1 + (shift - 1) s)`` with ``flow_shift`` (3 for SANA 1600M), and
``sampler.solver: dpmpp_2m`` is the pipeline's DPM-Solver++(2M) on it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from advantageflow.configbase import ConfigError
from advantageflow.models.diffusers_common import (
    DiffusersOptions,
    DiffusersPolicy,
    LoraOptions,
    autocast,
    scheduler_sigmas,
)
from advantageflow.models.tiny_pipelines import TEXT_WIDTH, tiny_tokenizer, token_ids_config

#: SANA's attention: linear self-attention ``attn1`` and cross-attention ``attn2``, both with
#: ``to_q/k/v`` and ``to_out.0`` (diffusers' SANA LoRA example adapts ``to_q/k/v``).
SANA_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: Prefix of the negative prompt's cache key: it is encoded without the complex human instruction.
NEGATIVE_KEY = "\0negative:"


@dataclass
class SanaLoraOptions(LoraOptions):
    """:class:`LoraOptions` with SANA's attention projections as the default targets."""

    target_modules: list[str] = field(default_factory=lambda: list(SANA_LORA_TARGETS))


def pipeline_instruction() -> list[str]:
    """The complex human instruction ``SanaPipeline.__call__`` uses by default."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def integer_timesteps(scheduler: Any) -> bool:
    """Whether ``scheduler`` hands out integer timesteps (``DPMSolverMultistepScheduler`` does)."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(2, device="cpu")
    return not probe.timesteps.is_floating_point()


class SanaPolicy(DiffusersPolicy):
    """SANA policy (see the module docstring).

    Conditioning (batch-first): ``prompt_embeds`` ``(B, L, D)`` and ``prompt_attention_mask``
    ``(B, L)`` (``L = max_sequence_length``: the pipeline pads to it), and with ``cfg`` the
    negative prompt's of the same shapes.
    """

    @dataclass
    class Config(DiffusersOptions):
        """The shared options (:class:`DiffusersOptions`) plus ``cfg``: encode the negative prompt
        so ``sampler.guidance_scale > 1`` applies CFG (the pipeline's default is 4.5), and
        ``complex_human_instruction``: prefix prompts with the pipeline's default instruction
        (as ``SanaPipeline.__call__``; ``false`` is ``complex_human_instruction=None``).
        ``max_sequence_length`` is the pipeline's 300 Gemma tokens; LoRA targets default to
        every attention projection (:data:`SANA_LORA_TARGETS`)."""

        name: str = "sana"
        path: str = "Efficient-Large-Model/Sana_1600M_512px_diffusers"
        max_sequence_length: int = 300
        lora: SanaLoraOptions = field(default_factory=SanaLoraOptions)
        cfg: bool = True
        complex_human_instruction: bool = True

        def validate(self) -> None:
            super().validate()
            if self.max_sequence_length < 2:
                raise ConfigError("model.max_sequence_length must be >= 2 for SANA (the first token is kept apart)")

    NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_prompt_attention_mask")

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        factor = pipe.vae_scale_factor * self.transformer.config.patch_size
        self._require_size_multiple(factor)
        self.sample_shape = (
            self.transformer.config.in_channels,
            cfg.height // pipe.vae_scale_factor,
            cfg.width // pipe.vae_scale_factor,
        )
        self._integer_timesteps = integer_timesteps(pipe.scheduler)
        self._instruction = pipeline_instruction() if cfg.complex_human_instruction else None

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import SanaPipeline

        return SanaPipeline

    # ------------------------------------------------------------------ prompts

    def _negative_key(self) -> str:
        return NEGATIVE_KEY + self.cfg.negative_prompt

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompts through ``encode_prompt`` with the instruction; negative-prompt keys without it
        (as the pipeline encodes its negative prompt)."""
        negative = [p.startswith(NEGATIVE_KEY) for p in prompts]
        rows: list[tuple[Tensor, Tensor]] = [None] * len(prompts)  # type: ignore[list-item]
        for is_negative in (False, True):
            idx = [i for i, n in enumerate(negative) if n == is_negative]
            if not idx:
                continue
            embeds, mask, _, _ = self.pipe.encode_prompt(
                [prompts[i].removeprefix(NEGATIVE_KEY) for i in idx],
                do_classifier_free_guidance=False,
                device=self.text_device,
                clean_caption=False,
                max_sequence_length=self.cfg.max_sequence_length,
                complex_human_instruction=None if is_negative else self._instruction,
            )
            for j, i in enumerate(idx):
                rows[i] = (embeds[j], mask[j])
        return {
            "prompt_embeds": torch.stack([e for e, _ in rows]).to(self.dtype),
            "prompt_attention_mask": torch.stack([m for _, m in rows]),
        }

    def _encodes_negative(self) -> bool:
        return self.cfg.cfg

    # ------------------------------------------------------------------ velocity and time grid

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer pass with the pipeline's timestep (see the module docstring)."""
        timestep = t.double() * 1000.0
        if self._integer_timesteps:
            # The scheduler truncates 1000 sigma (float64); t arrives in float32, off by up to
            # 6e-5 in 1000 t: the margin keeps e.g. t = 0.9 at 900, not 899.
            timestep = (timestep + 1e-4).floor()
        timestep = timestep.float()
        dtype = self._active_dtype()  # bf16 frozen base, or float32 for full fine-tuning
        with autocast(self.device, self.dtype):
            v = self._active(
                x.to(dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                encoder_attention_mask=cond["prompt_attention_mask"],
                timestep=timestep * self.transformer.config.timestep_scale,
                return_dict=False,
            )[0]
        if self.transformer.config.out_channels // 2 == self.sample_shape[0]:  # learned sigma: drop it
            v = v.chunk(2, dim=1)[0]
        return v

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:
        """The scheduler's sigmas for ``steps`` steps, ``(steps + 1,)`` decreasing to 0
        (``shift``, ``sampler.shift``, is ignored: the scheduler's config has its own), as
        ``SanaPipeline.__call__``: ``set_timesteps(steps)``."""
        return scheduler_sigmas(self.pipe, steps, num_inference_steps=steps)


def build_tiny_sana(seed: int = 0) -> Any:
    """A tiny ``SanaPipeline`` (random weights, float32, CPU) for tests and demos.

    A 2-block ``SanaTransformer2DModel`` (4 heads of 8, cross-attention width 32), an
    ``AutoencoderDC`` with two 8-channel stages (downsampling 2, 4 latent channels), a 2-layer
    Gemma-2 text encoder of width 32, and SANA 1600M's scheduler: DPM-Solver++(2M) on flow
    sigmas with ``flow_shift`` 3 (integer timesteps).
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(max_length=4096)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=8,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=TEXT_WIDTH,
        sample_size=32,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,  # SANA's DC-AE factor
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            **token_ids_config(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=4096,
        )
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        final_sigmas_type="zero",
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
