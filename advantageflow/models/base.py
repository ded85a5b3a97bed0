"""The policy protocol every model adapter implements, and shared helpers.

A *policy* is a conditional velocity field ``v(x_t, t, c)`` (see :mod:`advantageflow.types`
for the time convention) plus the few things the trainer needs around it.  Three policies
appear in the algorithms:

- **theta**, the trainable parameters as they are now;
- **old**, the rollout policy or a lagged/EMA copy: kept as a *snapshot* of the trainable
  parameters (``policy.snapshot()``) and swapped in with ``policy.use_parameters(snap)``;
  for LoRA the trainable parameters are only the adapter's, so this is cheap and never a
  second copy of the network;
- **ref**, the frozen base model: ``with policy.reference(): ...`` (LoRA adapter disabled,
  or a frozen copy for full fine-tuning).

Rule for algorithms: compute the ``old`` / ``ref`` predictions (no gradient) **before** the
forward pass that builds theta's graph.  Swapping parameters bumps their version counter, so
autograd raises instead of silently using the wrong values if this rule is broken.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from advantageflow.distributed import full_tensor, placed_like
from advantageflow.sampling import time_grid as uniform_shifted_grid


@dataclass
class Networks:
    """The modules a multi-process strategy wraps (:mod:`advantageflow.parallel`).

    Attributes:
        trained: the network holding the trainable parameters (the whole model, or the base
            model carrying the LoRA adapter).
        reference: its frozen copy for full fine-tuning (``None`` with LoRA, whose reference
            is the same network with the adapter off).
    """

    trained: nn.Module
    reference: nn.Module | None = None


@runtime_checkable
class FlowPolicy(Protocol):
    """What the trainer, the sampler and the algorithms need from a model.

    Attributes:
        sample_shape: per-sample state shape ``S`` (e.g. ``(2,)`` or ``(C, H, W)``).
        device: where the model lives.
        conditions_on_metadata: ``encode`` takes prompt records, not texts (an editing model).
    """

    sample_shape: tuple[int, ...]
    device: torch.device
    conditions_on_metadata: bool

    def velocity(self, x: Tensor, t: Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``(B, *S)`` at states ``x`` ``(B, *S)`` and times ``t`` ``(B,)``.

        Classifier-free guidance happens here (``v_u + s * (v_c - v_u)``) when
        ``guidance_scale != 1`` and the conditioning carries an unconditional branch, so no
        algorithm re-implements it.
        """

    def encode(self, prompts: list[str]) -> Any:
        """Conditioning for ``B`` prompts (batch-first; cacheable)."""

    def decode(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` from states ``(B, *S)``."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or all of them)."""

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which :meth:`velocity` is the frozen reference model's."""

    def trainable_state(self) -> dict[str, Tensor]:
        """Named trainable tensors, for checkpoints (CPU copies are fine)."""

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state` returned."""

    def snapshot(self) -> list[Tensor]:
        """Detached copies of the trainable parameters (the ``old`` policies' weights)."""

    def use_parameters(self, values: list[Tensor]) -> contextlib.AbstractContextManager:
        """Context in which the trainable parameters hold the values of a :meth:`snapshot`."""

    def networks(self) -> Networks | None:
        """The modules a multi-process strategy wraps and the compute meter hooks; ``None``
        for a policy without such modules (then only ``dist.strategy=allreduce`` applies)."""

    def set_trained_forward(self, forward: nn.Module) -> None:
        """Route the trained network's forward passes through ``forward`` (a DDP wrapper)."""

    def time_grid(self, steps: int, shift: float = 1.0) -> Tensor:
        """The sampler's time grid ``(steps + 1,)`` from 1 to 0: ours with ``shift``
        (``sampler.shift``), or a diffusers scheduler's own sigmas (which ignore it)."""

    def set_mode(self, training: bool) -> None:
        """Train mode (dropout on, gradient checkpointing armed) for the updates, eval mode for
        rollouts and evaluation: the trainer calls it around both, for every policy."""

    def cache_prompts(self, prompts: list[str]) -> None:
        """Encode every prompt of the run once, before training (text encoders may then be
        released); a no-op for policies whose encoding is cheap."""

    def memory(self) -> dict[str, float]:
        """Peak memory of this process, ``{"perf/max_memory_gb": ...}`` (GiB)."""

    def write_checkpoint_extras(self, state: dict[str, Tensor], folder: str) -> None:
        """Files for other tools written beside each checkpoint's weights (``state``, the
        trainable state being saved), e.g. a diffusers LoRA adapter; none by default."""

    def write_final_exports(self, run_dir: str) -> None:
        """Files written once at the end of a run (e.g. ``model.lora.merge_at_end``); none by default."""


def memory_per_process(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory of this process in GiB: CUDA's max allocated on a GPU, else peak RSS.

    Returns ``{"perf/max_memory_gb": ...}`` (plus ``perf/rss_gb`` on the CPU), for the metrics.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return {"perf/max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
    out = {"perf/max_memory_gb": peak_bytes / 2**30}
    try:
        with open("/proc/self/statm") as fh:
            out["perf/rss_gb"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        pass
    return out


class PolicyBase:
    """The defaults of :class:`FlowPolicy`'s members, and the helpers shared by adapters:
    snapshots, parameter swaps and trainable state.

    Subclasses provide ``velocity``, ``encode``, ``decode``, ``reference``,
    ``trainable_named_parameters``, the attributes of :class:`FlowPolicy` and ``_active``
    (the network ``velocity`` calls); they override the other members where they differ.
    Model classes also provide ``Config`` and ``from_config(cfg, device)``, and may override
    :meth:`preflight`.
    """

    device: torch.device
    #: ``encode`` takes the prompt records (text and metadata, e.g. an editing model's source
    #: image) instead of their texts (``rollouts.encode_prompts``).
    conditions_on_metadata: bool = False

    @classmethod
    def preflight(cls, cfg: Any) -> None:
        """Checks of the model's config section that need no weights (``validate`` runs them)."""

    def networks(self) -> Networks | None:
        return None

    def set_mode(self, training: bool) -> None:
        """The trained network follows ``training``; a frozen reference copy stays in eval mode."""
        nets = self.networks()
        if nets is not None:
            nets.trained.train(training)

    def time_grid(self, steps: int, shift: float = 1.0) -> Tensor:
        return uniform_shifted_grid(steps, shift)

    def cache_prompts(self, prompts: list[str]) -> None:
        return None

    def memory(self) -> dict[str, float]:
        return memory_per_process(self.device)

    def write_checkpoint_extras(self, state: dict[str, Tensor], folder: str) -> None:
        return None

    def write_final_exports(self, run_dir: str) -> None:
        return None

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:  # pragma: no cover
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def set_trained_forward(self, forward: nn.Module) -> None:
        """Route the trained network's forward passes (``self._active``, which
        :meth:`reference` swaps out and back) through ``forward``, a DDP wrapper."""
        self._active = forward

    def snapshot(self) -> list[Tensor]:
        """Detached copies of the trainable parameters, in :meth:`trainable_parameters` order."""
        return [p.detach().clone() for p in self.trainable_parameters()]

    @contextlib.contextmanager
    def use_parameters(self, values: list[Tensor]) -> Iterator[None]:
        """Temporarily give the trainable parameters the values of a snapshot.

        Copies in place under ``no_grad`` (bumping version counters; see the module note).
        """
        params = self.trainable_parameters()
        if len(values) != len(params):
            raise ValueError(f"snapshot has {len(values)} tensors, policy has {len(params)}")
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)

    def trainable_state(self) -> dict[str, Tensor]:
        """Whole CPU copies (sharded parameters are gathered: every process must call this)."""
        return {name: full_tensor(p.detach()).cpu().clone() for name, p in self.trainable_named_parameters()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        named = dict(self.trainable_named_parameters())
        missing = sorted(set(named) - set(state))
        unexpected = sorted(set(state) - set(named))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, p in named.items():
                if state[name].shape != p.shape:
                    raise ValueError(
                        f"checkpoint tensor '{name}' has shape {tuple(state[name].shape)}, "
                        f"model expects {tuple(p.shape)}"
                    )
                p.copy_(placed_like(state[name], p))


class FrozenCopyPolicy(PolicyBase):
    """Full fine-tuning of one network ``self.net`` with a frozen copy ``self.ref_net`` as the
    reference; ``self._active`` is the network ``velocity`` should call."""

    net: nn.Module
    ref_net: nn.Module
    _active: nn.Module

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.net.named_parameters())

    def networks(self) -> Networks:
        return Networks(trained=self.net, reference=self.ref_net)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        previous, self._active = self._active, self.ref_net
        try:
            yield
        finally:
            self._active = previous


def ema_update_(target: list[Tensor], source: list[Tensor], decay: float) -> None:
    """In place ``target = decay * target + (1 - decay) * source`` (tensors, no grad)."""
    with torch.no_grad():
        for tgt, src in zip(target, source):
            tgt.mul_(decay).add_(src.detach(), alpha=1.0 - decay)


def guided(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``v_u + scale * (v_c - v_u)``; ``scale = 1`` gives ``v_c``."""
    return v_uncond + scale * (v_cond - v_uncond)
