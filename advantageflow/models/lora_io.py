"""LoRA in and out of diffusers policies, in the formats other tools read and write.

Out: every checkpoint of a LoRA policy holds ``pytorch_lora_weights.safetensors`` in diffusers'
format (keys ``transformer.<module>.lora_A.weight``, the adapter's peft config as metadata so
rank and ``alpha`` survive), so ``pipe.load_lora_weights(checkpoint_dir)`` attaches it.

In: ``model.lora.init_from`` starts the adapter from

- diffusers format: a folder holding ``pytorch_lora_weights.safetensors`` or such a file
  (what ``save_lora_weights`` writes; our checkpoints and ``sample --export-lora`` too);
- PEFT format: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
  (what ``PeftModel.save_pretrained`` writes).

The adapter must fit ``model.lora``: the same rank and ``alpha`` (they set the scale
``alpha / rank``), and only modules that ``model.lora.target_modules`` covers; modules the
model adapts and the file does not keep their fresh (zero-update) initialisation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advantageflow.configbase import ConfigError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # the peft adapter name our policies train


@dataclass
class AdapterFile:
    """An adapter read from disk.

    Attributes:
        weights: ``<module>.lora_A.weight`` ``(r, in)`` / ``<module>.lora_B.weight`` ``(out, r)``.
        rank, alpha: its rank and scale numerator (``alpha = rank`` when the file does not say,
            as diffusers assumes).
        source: where it came from and in which format (for messages).
    """

    weights: dict[str, Tensor]
    rank: int
    alpha: float
    source: str

    @property
    def modules(self) -> set[str]:
        return {k.rsplit(".lora_", 1)[0] for k in self.weights}


def to_diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A policy's trainable LoRA state (peft names ``<module>.lora_A.default.weight``) as
    float32 CPU tensors named ``<module>.lora_A.weight`` (what ``save_lora_weights`` takes)."""
    suffix = f".{ADAPTER}.weight"
    return {
        k.replace(suffix, ".weight"): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
        if "lora_" in k
    }


def write_diffusers_adapter(pipeline_cls: Any, state: dict[str, Tensor], metadata: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` with ``pipeline_cls.save_lora_weights``.

    Args:
        state: the trainable LoRA state (:func:`to_diffusers_names` renames it).
        metadata: the adapter's ``LoraConfig.to_dict()`` (rank, alpha, targets).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        str(out),
        transformer_lora_layers=to_diffusers_names(state),
        transformer_lora_adapter_metadata=_jsonable_config(metadata),
    )
    return out / ADAPTER_FILE


def _jsonable_config(config: dict) -> dict:
    """A ``LoraConfig.to_dict()`` with sets as sorted lists (the metadata is JSON)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def read_adapter(path: str) -> AdapterFile:
    """The adapter at ``path`` (diffusers or PEFT format, see the module docstring);
    ``ConfigError`` naming ``model.lora.init_from`` when it is missing or unreadable."""
    where = Path(path).expanduser()
    if not where.exists():
        raise ConfigError(f"model.lora.init_from '{path}' does not exist")
    if where.is_dir() and (where / PEFT_CONFIG).is_file():
        return _read_peft(where)
    file = where / ADAPTER_FILE if where.is_dir() else where
    if not file.is_file():
        raise ConfigError(
            f"model.lora.init_from '{path}' holds neither {ADAPTER_FILE} (diffusers format) nor "
            f"{PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT format)"
        )
    return _read_diffusers(file)


def _load_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"model.lora.init_from: cannot read '{file}' as safetensors ({err})") from None


def _read_diffusers(file: Path) -> AdapterFile:
    raw, header = _load_safetensors(file)
    others = sorted({k.split(".", 1)[0] for k in raw if not k.startswith("transformer.")})
    if others:
        raise ConfigError(
            f"model.lora.init_from '{file}' holds LoRA weights for {', '.join(others)}; only transformer "
            "adapters in diffusers format (keys transformer.<module>.lora_A.weight) can be trained"
        )
    weights = {k.removeprefix("transformer."): v for k, v in raw.items()}
    # save_lora_weights stores the peft config as JSON under "lora_adapter_metadata", each key
    # prefixed with its component ("transformer.r", "transformer.lora_alpha", ...).
    meta = json.loads(header.get("lora_adapter_metadata") or "{}")
    config = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    return _adapter(weights, config, f"'{file}' (diffusers format)")


def _read_peft(folder: Path) -> AdapterFile:
    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    if not (folder / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"model.lora.init_from '{folder}' has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    raw, _ = _load_safetensors(folder / PEFT_WEIGHTS)
    weights = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
    return _adapter(weights, config, f"'{folder}' (PEFT format)")


def _adapter(weights: dict[str, Tensor], config: dict, source: str) -> AdapterFile:
    """Check the key layout and read rank / alpha (from the config, else from the shapes)."""
    bad = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad or not weights:
        raise ConfigError(
            f"model.lora.init_from {source}: not a LoRA adapter in diffusers/PEFT layout "
            f"(unexpected keys such as {bad[:2]})"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(
            f"model.lora.init_from {source}: per-module ranks or alphas (rank_pattern / "
            "alpha_pattern) are not supported"
        )
    ranks = {int(v.shape[0]) for k, v in weights.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ConfigError(f"model.lora.init_from {source}: modules have different ranks {sorted(ranks)}")
    rank = int(config.get("r", next(iter(ranks))))
    alpha = float(config.get("lora_alpha", rank))
    return AdapterFile(weights=weights, rank=rank, alpha=alpha, source=source)


def load_adapter(transformer: nn.Module, lora: Any, adapter: AdapterFile) -> None:
    """Copy ``adapter`` into ``transformer``'s peft adapter (made from ``lora``, a
    ``LoraOptions``); ``ConfigError`` naming the mismatch when it does not fit."""
    ours = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    our_modules = {n.rsplit(".lora_", 1)[0] for n in ours}
    if adapter.rank != lora.rank:
        raise ConfigError(
            f"model.lora.init_from {adapter.source} has rank {adapter.rank}, model.lora.rank is "
            f"{lora.rank}: set model.lora.rank={adapter.rank}"
        )
    if abs(adapter.alpha - lora.alpha) > 1e-6 * max(1.0, abs(lora.alpha)):
        raise ConfigError(
            f"model.lora.init_from {adapter.source} has alpha {adapter.alpha:g}, model.lora.alpha is "
            f"{lora.alpha:g}: set model.lora.alpha={adapter.alpha:g}"
        )
    extra = sorted(adapter.modules - our_modules)
    if extra:
        raise ConfigError(
            f"model.lora.init_from {adapter.source} adapts {len(extra)} module(s) that model.lora.target_modules "
            f"({', '.join(lora.target_modules)}) does not cover, e.g. {', '.join(extra[:3])}"
        )
    with torch.no_grad():
        for key, value in adapter.weights.items():
            name = key.replace(".weight", f".{ADAPTER}.weight")
            if ours[name].shape != value.shape:
                raise ConfigError(
                    f"model.lora.init_from {adapter.source}: '{key}' has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(ours[name].shape)}"
                )
            ours[name].copy_(value.to(ours[name].dtype))
    fresh = len(our_modules - adapter.modules)
    if fresh:
        print(
            f"[advantageflow] model.lora.init_from: {fresh} of {len(our_modules)} adapted modules are not in "
            f"{adapter.source}; they start at zero update",
            file=sys.stderr,
        )
