"""Checks every diffusers adapter's test file runs on its tiny pipeline (LoRA export, gradient
checkpointing), written once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def perturb_lora(policy: Any, seed: int = 0, scale: float = 0.2) -> None:
    """Give the LoRA weights random values so the adapter changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def check_exported_lora(
    policy: Any,
    fresh_pipeline: Callable[[], Any],
    pipeline_samples: Callable[[Any, torch.Tensor], torch.Tensor],
    our_samples: Callable[[torch.Tensor], torch.Tensor],
    tmp_path: Path,
) -> None:
    """``export_lora(policy)`` then ``pipe.load_lora_weights`` in a fresh pipeline: the pipeline's
    samples from one noise ``(1, *S)`` equal ours to 1e-4 (and differ without the adapter)."""
    from advantageflow.models.export import export_lora

    perturb_lora(policy)
    noise = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(4))
    ours = our_samples(noise)
    export_lora(policy, str(tmp_path))
    pipe = fresh_pipeline()
    assert (pipeline_samples(pipe, noise) - ours).abs().max() > 1e-2  # the adapter matters
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(pipeline_samples(pipe, noise), ours, atol=1e-4, rtol=1e-4)


def check_checkpointing(plain: Any, ckpt: Any, prompts: list[str]) -> None:
    """``plain`` and ``ckpt`` (the same model with ``gradient_checkpointing``) give the same LoRA
    gradients for one velocity."""
    perturb_lora(plain, seed=3)
    ckpt.load_trainable_state(plain.trainable_state())
    x = torch.randn(len(prompts), *plain.sample_shape, generator=torch.Generator().manual_seed(6))
    t = torch.full((len(prompts),), 0.6)
    grads = []
    for policy in (plain, ckpt):
        policy.velocity(x, t, policy.encode(prompts)).pow(2).mean().backward()
        grads.append([p.grad for p in policy.trainable_parameters()])
    assert ckpt.transformer.gradient_checkpointing and any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def check_exported_lora_velocity(policy: Any, pipeline_dir: str, cond: Any, tmp_path: Path) -> None:
    """``export_lora(policy)``, then diffusers' own ``load_lora_weights`` into a fresh pipeline
    from ``pipeline_dir``: its transformer in our call gives our velocity at ``cond`` (to 1e-5),
    and the adapter changes the velocity (> 1e-2)."""
    from advantageflow.models.export import export_lora

    perturb_lora(policy, seed=5)
    export_lora(policy, str(tmp_path))
    fresh = type(policy.pipe).from_pretrained(pipeline_dir)
    fresh.load_lora_weights(str(tmp_path))
    x = torch.randn(1, *policy.sample_shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours = policy.velocity(x, t, cond)
        with policy.reference():
            base = policy.velocity(x, t, cond)
        policy.set_trained_forward(fresh.transformer)  # the loaded pipeline's network in our call
        theirs = policy.velocity(x, t, cond)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
