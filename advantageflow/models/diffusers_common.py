"""What the diffusers adapters (SD3, FLUX, Qwen-Image, SANA) share: loading, LoRA through peft,
prompt caching, CFG, mixed precision, VAE decoding and memory figures.

diffusers, transformers and peft are imported inside functions so that
``import advantageflow`` stays fast and works without them.

Precision: on CUDA the frozen weights are stored in ``dtype`` (bf16 by default) and forward
passes run under ``torch.autocast``; trainable weights (LoRA, or the whole transformer for full
fine-tuning) are float32, and every velocity / image leaves the adapter as float32 so that
log-probabilities and losses are computed in float32.  On the CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advantageflow.configbase import ConfigError
from advantageflow.models.base import Networks, PolicyBase, guided
from advantageflow.models.lora_io import ADAPTER, load_adapter, read_adapter, write_diffusers_adapter

#: The authors' LoRA targets (Flow-GRPO, AWM, DiffusionNFT): every attention projection of
#: the joint blocks, image stream (``to_*``) and text stream (``add_*``).
DEFAULT_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]

DType = Literal["bfloat16", "float16", "float32"]


@dataclass
class LoraOptions:
    """LoRA settings (peft).  ``enabled: false`` means full fine-tuning with a frozen copy.

    Attributes:
        rank, alpha: LoRA rank ``r`` and scale numerator (the update is ``alpha / r * B A``).
        target_modules: module-name suffixes that receive an adapter.
        dropout: LoRA dropout (0 keeps the velocity deterministic).
        init_from: start from this adapter instead of ``B = 0`` (diffusers or PEFT format,
            :mod:`advantageflow.models.lora_io`); rank, alpha and targets must fit.
        merge_at_end: when training ends, also write the adapter merged into the weights as
            ``RUN/merged/transformer`` (``from_pretrained``-loadable).

    Every checkpoint also holds the adapter in diffusers' format (``load_lora_weights``).
    """

    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    dropout: float = 0.0
    init_from: str = ""
    merge_at_end: bool = False

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError("lora.rank must be >= 1")
        if self.enabled and not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout must be in [0, 1)")
        if self.init_from and not self.enabled:
            raise ConfigError("lora.init_from needs lora.enabled=true (full fine-tuning has no adapter)")
        if self.merge_at_end and not self.enabled:
            raise ConfigError("lora.merge_at_end needs lora.enabled=true (full fine-tuning has no adapter to merge)")


@dataclass
class DiffusersOptions:
    """The ``model:`` options every diffusers adapter shares; each adapter's ``Config``
    subclasses it, sets ``name`` / ``path`` / ``max_sequence_length`` and adds its own.

    Attributes:
        path: hub id or local folder of the pipeline.
        dtype: storage dtype of frozen weights on CUDA (CPU is always float32).
        text_encoder_device: where the text encoders run ('' = the model's device).
        lora: LoRA settings; ``lora.enabled: false`` is full fine-tuning with a frozen copy.
        gradient_checkpointing: recompute transformer blocks in the backward pass.
        height, width: image size in pixels.
        negative_prompt: the unconditional prompt for CFG.
        max_sequence_length: T5 tokens.
        release_text_encoders: free the text encoders after prompts are cached.
    """

    name: str = ""
    path: str = ""
    dtype: DType = "bfloat16"
    text_encoder_device: str = ""
    lora: LoraOptions = field(default_factory=LoraOptions)
    gradient_checkpointing: bool = False
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    max_sequence_length: int = 512
    release_text_encoders: bool = False

    def validate(self) -> None:
        check_common_options(self)


def check_common_options(cfg: Any) -> None:
    """Validation shared by the SD3 and FLUX configs (one-line errors)."""
    if not cfg.path:
        raise ConfigError("model.path must be a hub id or a local folder")
    if cfg.height < 8 or cfg.width < 8:
        raise ConfigError("model.height and model.width must be >= 8 pixels")
    if cfg.max_sequence_length < 1:
        raise ConfigError("model.max_sequence_length must be >= 1")


# --------------------------------------------------------------------------- devices and precision


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The storage dtype of frozen weights: ``name`` on CUDA, float32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on CUDA with a half dtype; a no-op otherwise (the CPU stays float32)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- loading


def load_pipeline(pipeline_cls: Any, path: str, dtype: torch.dtype) -> Any:
    """``pipeline_cls.from_pretrained(path, torch_dtype=dtype)`` with a one-line error."""
    import warnings

    check_model_path(path)
    try:
        with warnings.catch_warnings():  # diffusers >= 0.41 prefers `dtype`; older ones need this
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            warnings.filterwarnings("ignore", message=".*use `dtype`.*")
            pipe = pipeline_cls.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load a {pipeline_cls.__name__} from '{path}': {first}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PREFIX = "tiny:"
# A Hugging Face repo id: owner/name of letters, digits, '-', '_', '.' (no '--' or '..').
HUB_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94})/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94})$")


def _tiny_spec(path: str) -> tuple[str, int]:
    """``tiny:KIND[:SEED]`` -> ``(KIND, SEED)``; ``ConfigError`` if malformed."""
    from advantageflow.models.tiny_pipelines import BUILDERS

    kind, _, seed = path[len(TINY_PREFIX) :].partition(":")
    if kind not in BUILDERS or (seed and not seed.isdigit()):
        kinds = " or ".join(f"tiny:{k}" for k in BUILDERS)
        raise ConfigError(f"model.path '{path}': expected {kinds}, optionally tiny:KIND:SEED")
    return kind, int(seed or 0)


def check_model_path(path: str) -> None:
    """``ConfigError`` naming ``model.path`` unless it is ``tiny:KIND[:SEED]``, an existing
    folder, or plausibly a hub id (``owner/name``; whether the hub has it is known only when
    loading).  ``validate`` and :func:`load_pipeline` both run it."""
    if not path:
        raise ConfigError("model.path must be a hub id or a local folder")
    if path.startswith(TINY_PREFIX):
        _tiny_spec(path)
        return
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    if os.path.exists(local) or looks_local:
        raise ConfigError(f"model.path '{path}' is not a folder (give a diffusers model folder or a hub id)")
    if not HUB_ID_RE.match(path) or "--" in path or ".." in path:
        raise ConfigError(
            f"model.path '{path}' is neither an existing folder nor a hub id of the form 'owner/name' "
            "(e.g. stabilityai/stable-diffusion-3.5-medium)"
        )


def resolve_path(path: str) -> str:
    """``tiny:sd3`` / ``tiny:flux`` (optionally ``tiny:sd3:SEED``) build a tiny random pipeline
    once per process (:mod:`advantageflow.models.tiny_pipelines`); anything else is a hub id or
    a folder, returned as is."""
    if not path.startswith(TINY_PREFIX):
        return path
    from advantageflow.models.tiny_pipelines import tiny_pipeline_dir

    return tiny_pipeline_dir(*_tiny_spec(path))


def add_lora(transformer: nn.Module, lora: LoraOptions) -> None:
    """Attach a peft LoRA adapter named ``default``; only its weights stay trainable (float32)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora.target_modules),
    )
    try:
        transformer.add_adapter(config)
    except ValueError as err:
        raise ConfigError(f"model.lora.target_modules: {err}") from None
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def lora_parameters(transformer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA weight, in a fixed order."""
    return [(n, p) for n, p in transformer.named_parameters() if "lora_" in n]


# --------------------------------------------------------------------------- the shared adapter


class DiffusersPolicy(PolicyBase):
    """Shared body of :class:`~advantageflow.models.diffusers_sd3.SD3Policy` and
    :class:`~advantageflow.models.diffusers_flux.FluxPolicy`.

    Subclasses define ``pipeline_class()``, ``_encode_batch(prompts) -> dict`` (conditioning
    rows for each prompt, batch-first), ``_forward(x, t, cond) -> v`` (one transformer pass,
    no guidance) and ``sample_shape``; everything else lives here.

    Attributes:
        pipe: the diffusers pipeline (its text encoders may be released after caching).
        transformer: the trained network (with the LoRA adapter when LoRA is on).
        ref_transformer: frozen copy for full fine-tuning, else ``None``.
    """

    #: conditioning keys holding the unconditional (negative prompt) branch.
    NEGATIVE_KEYS: tuple[str, ...] = ()

    def __init__(self, cfg: Any, pipe: Any, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = torch_dtype(cfg.dtype, self.device)
        self.pipe = pipe
        self.transformer = pipe.transformer
        self._prompt_cache: dict[str, dict[str, Tensor]] = {}
        self._released = False
        text_device = torch.device(cfg.text_encoder_device) if cfg.text_encoder_device else self.device
        self.text_device = text_device
        for name, module in pipe.components.items():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
                module.to(text_device if name.startswith("text_encoder") else self.device)
        if cfg.lora.enabled:
            add_lora(self.transformer, cfg.lora)
            if cfg.lora.init_from:
                load_adapter(self.transformer, cfg.lora, read_adapter(cfg.lora.init_from))
            self.ref_transformer = None
        else:
            self.ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
            self.transformer.float().requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()  # the trainer's set_mode switches it (eval for rollouts)
        self._active = self.transformer

    def _require_size_multiple(self, factor: int) -> None:
        """Refuse a ``model.height`` / ``model.width`` the pipeline cannot tile (not a multiple
        of ``factor``, the VAE's downsampling times the transformer's patch)."""
        if self.cfg.height % factor or self.cfg.width % factor:
            raise ConfigError(f"model.height and model.width must be multiples of {factor} for this pipeline")

    @classmethod
    def pipeline_class(cls) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def preflight(cls, cfg: Any) -> None:
        """The checks :meth:`from_config` makes before loading weights (``validate`` runs them)."""
        check_model_path(cfg.path)
        if cfg.lora.enabled and cfg.lora.init_from:
            read_adapter(cfg.lora.init_from)  # exists and is an adapter; whether it fits needs the model

    @classmethod
    def from_config(cls, cfg: Any, device: str = "cpu") -> DiffusersPolicy:
        """Load ``cfg.path`` (hub id or folder) and wrap it."""
        dev = torch.device(device)
        pipe = load_pipeline(cls.pipeline_class(), resolve_path(cfg.path), torch_dtype(cfg.dtype, dev))
        return cls(cfg, pipe, dev)

    # ------------------------------------------------------------------ parameters and reference

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.cfg.lora.enabled:
            return lora_parameters(self.transformer)
        return list(self.transformer.named_parameters())

    def networks(self) -> Networks:
        return Networks(trained=self.transformer, reference=self.ref_transformer)

    # ------------------------------------------------------------------ files for other tools

    def write_checkpoint_extras(self, state: dict[str, Tensor], folder: str) -> None:
        """Beside a checkpoint's ``policy.safetensors`` (``state``): the LoRA adapter in diffusers'
        format, so that ``pipe.load_lora_weights(folder)`` attaches it (nothing for full fine-tuning)."""
        if self.cfg.lora.enabled:
            write_diffusers_adapter(type(self.pipe), state, self.transformer.peft_config[ADAPTER].to_dict(), folder)

    def write_final_exports(self, run_dir: str) -> None:
        """When training ends: ``run_dir/merged/transformer`` if ``model.lora.merge_at_end``."""
        if not (self.cfg.lora.enabled and self.cfg.lora.merge_at_end):
            return
        from advantageflow.distributed import is_sharded
        from advantageflow.models.export import export_transformer

        if any(is_sharded(p) for p in self.trainable_parameters()):
            print("[advantageflow] model.lora.merge_at_end skipped: the weights are sharded (FSDP); load the last "
                  "checkpoint's adapter with pipe.load_lora_weights and call pipe.fuse_lora()", file=sys.stderr)
            return
        export_transformer(self, os.path.join(run_dir, "merged"))

    def _active_dtype(self) -> torch.dtype:
        """The dtype of the network ``velocity`` calls (bf16 frozen base, or float32 weights for
        full fine-tuning); seen through a DDP wrapper."""
        return getattr(self._active, "module", self._active).dtype

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base model: LoRA adapter disabled, or the frozen copy."""
        if self.ref_transformer is not None:
            previous, self._active = self._active, self.ref_transformer
            try:
                yield
            finally:
                self._active = previous
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()
            # peft toggles requires_grad when it disables adapters: restore it explicitly.
            for _, p in lora_parameters(self.transformer):
                p.requires_grad_(True)

    # ------------------------------------------------------------------ prompts

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Batch-first conditioning for ``prompts``, each prompt encoded once and cached.

        Keys are the subclass's (prompt embeddings, pooled embeddings, and the negative
        prompt's when CFG is on); every tensor is ``(B, ...)`` on the model's device.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        cond = self._stacked(prompts)
        if self._encodes_negative():
            neg = self._stacked([self._negative_key()])
            for key in self.NEGATIVE_KEYS:  # "negative_X" is the negative prompt's "X", one per row
                row = neg[key.removeprefix("negative_")]
                cond[key] = row.expand(len(prompts), *row.shape[1:])
        return cond

    def _stacked(self, prompts: list[str]) -> dict[str, Tensor]:
        self._ensure_cached(prompts)
        rows = [self._prompt_cache[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _encodes_negative(self) -> bool:
        """Whether :meth:`encode` also carries the negative prompt (CFG on); the subclass's switch."""
        return False

    def cache_prompts(self, prompts: list[str], release_text_encoders: bool | None = None) -> None:
        """Encode every prompt a run will use, then free the text encoders when
        ``release_text_encoders`` (default: ``model.release_text_encoders``) is true.

        Call it once with the train and test prompts; :meth:`encode` alone never releases.
        """
        self._ensure_cached(list(prompts) + self._extra_prompts())
        release = self.cfg.release_text_encoders if release_text_encoders is None else release_text_encoders
        if release:
            self.release_text_encoders()

    def _extra_prompts(self) -> list[str]:
        """Prompts every batch needs besides its own (the negative prompt under CFG)."""
        return [self._negative_key()] if self._encodes_negative() else []

    def _negative_key(self) -> str:
        """The prompt-cache key of the negative prompt: the text itself, unless the pipeline
        encodes negative prompts differently from prompts (then a key its ``_encode_batch`` knows)."""
        return self.cfg.negative_prompt

    def _ensure_cached(self, prompts: list[str]) -> None:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if not todo:
            return
        if self._released:
            raise RuntimeError(
                f"prompt {todo[0]!r} was not cached before the text encoders were released; "
                "pass every prompt to policy.cache_prompts first, or set model.release_text_encoders=false"
            )
        with torch.no_grad():
            batch = self._encode_batch(todo)
        for i, p in enumerate(todo):
            self._prompt_cache[p] = {k: v[i].to(self.device) for k, v in batch.items()}

    def release_text_encoders(self) -> None:
        """Drop the text encoders (prompts already cached keep working)."""
        for name in list(self.pipe.components):
            if name.startswith("text_encoder") and getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self._released = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ velocity

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _split_negative(self, cond: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """(conditional, unconditional) conditioning; the latter is ``None`` without CFG embeds."""
        if not self.NEGATIVE_KEYS or self.NEGATIVE_KEYS[0] not in cond:
            return cond, None
        positive = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        negative = dict(positive)
        for key in self.NEGATIVE_KEYS:
            negative[key.removeprefix("negative_")] = cond[key]
        return positive, negative

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``(B, *S)`` (float32) at latents ``x`` ``(B, *S)``, times ``t`` ``(B,)`` in [0, 1].

        With ``guidance_scale != 1`` the conditional and negative-prompt branches run as one
        batch ``[uncond, cond]`` (as the diffusers pipeline does) and are combined as
        ``v_u + s (v_c - v_u)``.
        """
        if x.shape[1:] != tuple(self.sample_shape):
            raise ValueError(
                f"latents have shape {tuple(x.shape[1:])}, the model expects {self.sample_shape}"
            )
        positive, negative = self._split_negative(cond)
        if guidance_scale == 1.0:
            return self._forward(x, t, positive).float()
        if negative is None:
            raise ValueError(self._no_cfg_message())
        return self._guided_velocity(x, t, positive, negative, guidance_scale)

    def _guided_velocity(
        self, x: Tensor, t: Tensor, positive: dict[str, Tensor], negative: dict[str, Tensor], scale: float
    ) -> Tensor:
        """CFG as one batch ``[uncond, cond]``, ``v_u + s (v_c - v_u)`` (SD3's, SANA's and FLUX's
        true-CFG form); a pipeline that guides differently overrides it."""
        both = {k: torch.cat([negative[k], positive[k]]) for k in positive}
        v = self._forward(torch.cat([x, x]), torch.cat([t, t]), both).float()
        v_uncond, v_cond = v.chunk(2)
        return guided(v_cond, v_uncond, scale)

    def _no_cfg_message(self) -> str:
        return "guidance_scale != 1 needs the negative-prompt embeddings: set model.cfg=true"

    # ------------------------------------------------------------------ decoding

    def decode(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (float32) from latents ``(B, *S)``; differentiable.

        ``vae.decode(x / scaling_factor + shift_factor)`` (no shift for VAEs without one) mapped
        from ``[-1, 1]`` to ``[0, 1]``.
        """
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with autocast(self.device, self.dtype):
            image = vae.decode(latents.to(self.device, vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ time grid

    def time_grid(self, steps: int, shift: float | None = None) -> Tensor:  # pragma: no cover - overridden
        """The scheduler's sigmas; ``shift`` (``sampler.shift``) is ignored: the scheduler has its own."""
        raise NotImplementedError


def scheduler_sigmas(pipe: Any, steps: int, **set_timesteps_kwargs: Any) -> Tensor:
    """The scheduler's sigma grid ``(steps + 1,)`` (float64, decreasing, last 0), computed by a
    fresh copy of the pipeline's scheduler with the arguments its ``__call__`` would pass."""
    if steps < 1:
        raise ValueError("a time grid needs at least one step")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(device="cpu", **set_timesteps_kwargs)
    sigmas = scheduler.sigmas.to(torch.float64)
    if sigmas.shape[0] != steps + 1 or float(sigmas[-1]) != 0.0:
        raise RuntimeError(f"scheduler returned {sigmas.shape[0]} sigmas for {steps} steps")
    return sigmas
