"""Export a trained diffusers policy so that plain diffusers scripts can use it, and rebuild a
policy from a checkpoint's trainable state.

LoRA export writes ``pytorch_lora_weights.safetensors`` in diffusers' format (keys
``transformer.<module>.lora_A.weight`` ...) with the adapter's peft config as metadata (so rank
and ``alpha`` survive: without it diffusers would assume ``alpha = rank``).  A plain script
then reproduces our samples::

    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    pipe.load_lora_weights(export_dir)
    pipe(prompt, latents=..., num_inference_steps=N, guidance_scale=...)

Full fine-tuning exports the transformer with ``save_pretrained`` into ``export_dir/transformer``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

EXPORT_INFO = "advantageflow_export.txt"


def export_lora(policy: Any, out_dir: str) -> str:
    """Save ``policy``'s LoRA adapter in diffusers' format into ``out_dir``; returns ``out_dir``.

    Raises ``ValueError`` when the policy is fully fine-tuned (use :func:`export_transformer`).
    """
    if not policy.cfg.lora.enabled:
        raise ValueError("this policy has no LoRA adapter (full fine-tuning): use export_transformer")
    policy.write_checkpoint_extras(policy.trainable_state(), out_dir)  # the same file every checkpoint holds
    _write_info(policy, out_dir, "lora")
    return out_dir


def export_transformer(policy: Any, out_dir: str) -> str:
    """Save the (fully fine-tuned, or LoRA-merged) transformer into ``out_dir/transformer``.

    With LoRA the adapter is merged into a copy of the weights, leaving the policy untouched.
    """
    import copy

    transformer = policy.transformer
    if policy.cfg.lora.enabled:
        transformer = copy.deepcopy(transformer)
        transformer.fuse_lora()
        transformer.unload_lora()
    target = Path(out_dir) / "transformer"
    transformer.save_pretrained(str(target))
    _write_info(policy, out_dir, "transformer")
    return out_dir


def _write_info(policy: Any, out_dir: str, kind: str) -> None:
    import yaml

    info = {"kind": kind, "model": asdict(policy.cfg)}
    with open(Path(out_dir) / EXPORT_INFO, "w", encoding="utf-8") as fh:
        fh.write("# Written by advantageflow.models.export; load with diffusers' load_lora_weights.\n")
        yaml.safe_dump(info, fh, sort_keys=False)


def load_policy(model_cfg: Any, state: dict[str, Tensor] | str | None = None, device: str = "cpu") -> Any:
    """Build the policy ``model_cfg`` describes and load a trainable state into it.

    Args:
        model_cfg: the run's ``model`` config (its ``name`` picks the adapter).
        state: ``policy.trainable_state()`` as a dict, a path to a file holding it
            (``.safetensors`` or a ``torch.save`` file, optionally under a ``"policy"`` key),
            or ``None`` for the base model.
    """
    from advantageflow.models import MODELS

    policy = MODELS.get(model_cfg.name).from_config(model_cfg, device)
    if isinstance(state, (str, os.PathLike)):
        state = read_state(str(state))
    if state is not None:
        policy.load_trainable_state(state)
    return policy


def read_state(path: str) -> dict[str, Tensor]:
    """A trainable state from ``path`` (safetensors, or torch with an optional ``policy`` key)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "policy" in data and isinstance(data["policy"], dict):
        data = data["policy"]
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' does not hold a dict of tensors")
    return data
