"""The small surface every algorithm file implements: a subclass of :class:`AlgorithmBase`.

An algorithm is a class with:

- ``Config``: a dataclass of its hyper-parameters (the authors' defaults), filled from the
  config section named after the algorithm;
- ``__init__(self, cfg, policy)``;
- ``sampler_request(self, epoch, generator) -> SamplerRequest``: what the rollouts must
  carry (final samples only, an SDE trajectory with log-probs, a kept trajectory);
- ``begin_epoch(self, policy)``: called after the rollouts, before the first update
  (freeze the old policy here);
- ``losses(self, batch, ctx) -> Iterator[LossOutput]``: the loss of one micro-batch
  ``batch`` (a :class:`~advantageflow.types.Rollout` with ``advantages``), as one or more
  terms whose sum is that micro-batch's mean loss.  The trainer back-propagates each term
  as it comes, so an algorithm that trains on many timesteps never holds all their graphs;
- ``after_step(self, policy, step)``: called after each optimizer step (EMA updates);
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint must keep.

Members with a default in :class:`AlgorithmBase`, overridden where a method needs them:

- ``rollout_policy(self, policy)``: a context manager within which the epoch's rollouts are
  sampled (DiffusionNFT samples with its old policy); default: theta as it is;
- ``end_epoch(self, policy, steps_done)``: after the epoch's optimizer steps, with the number
  of optimizer steps taken so far (counted from 1): once-per-epoch updates of an old policy;
- class attributes: ``requires_differentiable_reward`` (DRaFT), ``drop_zero_std_groups``
  (Flow-GRPO filters groups whose rewards are all equal), ``clip_key``: the field of
  ``Config`` that is the algorithm's own advantage clip (``adv_clip``), which then owns the
  run's clip (:func:`advantageflow.config.advantage_clip`), and ``conventions``:
  ``{dotted key outside the algorithm's section: (value, why)}``, the authors' settings of
  other sections that the method assumes (EPG: ``advantage.std: none``); a config that differs
  gets a note naming the key from ``validate`` and ``train``
  (:func:`advantageflow.config.convention_notes`), not an error: deviating may be the experiment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from advantageflow.sampling import SamplerRequest
from advantageflow.seeding import RowRandom
from advantageflow.types import LossOutput, Rollout


@dataclass
class TrainContext:
    """What a loss may use besides its batch.

    Attributes:
        policy: the policy being trained.
        generator: draws shared by the whole optimizer step (e.g. AWM's timesteps): keyed by
            the step, so every micro-batch of the step, on every process, draws the same.
        rows: per-sample draws (training times, noise), keyed by each sample's global index:
            see :meth:`row_random`.
        step: optimizer steps completed so far.
        reward: the configured reward (``reward(images, prompts, metadata) -> RewardResult``).
        guidance_scale: the rollout's CFG scale.
    """

    policy: Any
    generator: torch.Generator
    step: int
    reward: Any = None
    guidance_scale: float = 1.0
    rows: RowRandom | None = None

    def row_random(self, batch_size: int) -> RowRandom:
        """Per-sample draws for the batch: the trainer's (keyed by global sample index, so a
        step's loss does not depend on micro-batch size or process count), or, for a context
        made without them, rows seeded from :attr:`generator`."""
        if self.rows is None:
            self.rows = RowRandom.from_generator(self.generator, batch_size)
        if len(self.rows) != batch_size:
            raise ValueError(f"context has {len(self.rows)} row generators for a batch of {batch_size}")
        return self.rows


class Algorithm(Protocol):
    """The shared signature (see the module docstring)."""

    Config: type
    requires_differentiable_reward: ClassVar[bool]
    drop_zero_std_groups: ClassVar[bool]
    clip_key: ClassVar[str | None]
    conventions: ClassVar[dict[str, tuple[Any, str]]]

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest: ...

    def rollout_policy(self, policy: Any) -> contextlib.AbstractContextManager: ...

    def begin_epoch(self, policy: Any) -> None: ...

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]: ...

    def after_step(self, policy: Any, step: int) -> None: ...

    def end_epoch(self, policy: Any, steps_done: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AlgorithmBase:
    """The defaults of :class:`Algorithm`'s optional members; every algorithm subclasses it
    and implements ``Config``, ``sampler_request``, ``losses`` and what it keeps over epochs."""

    requires_differentiable_reward: ClassVar[bool] = False
    drop_zero_std_groups: ClassVar[bool] = False
    clip_key: ClassVar[str | None] = None  # no clip of its own: advantage.clip (default 5) applies
    conventions: ClassVar[dict[str, tuple[Any, str]]] = {}

    def rollout_policy(self, policy: Any) -> contextlib.AbstractContextManager:
        """Rollouts sample with theta."""
        return contextlib.nullcontext()

    def begin_epoch(self, policy: Any) -> None:
        """Nothing to freeze."""

    def after_step(self, policy: Any, step: int) -> None:
        """No per-step update."""

    def end_epoch(self, policy: Any, steps_done: int) -> None:
        """No once-per-epoch update."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
