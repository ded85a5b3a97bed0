"""Pieces shared by the forward-process algorithms: the lagged (old/EMA) policy, timestep
draws and forward noising.  Pure maths where possible; no algorithm logic lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.distributed import full_tensor, placed_like
from advantageflow.models.base import ema_update_
from advantageflow.seeding import RowRandom
from advantageflow.types import expand_time


@dataclass
class EMASchedule:
    """Decay of the lagged copy when ``steps_done`` optimizer steps have been taken (counted
    from 1, as the released codes count their global step after incrementing it):
    ``0`` for ``steps_done < delay``, then ``min(rate * (steps_done - delay), max_decay)``.

    DiffusionNFT: ``rate 0.001, max 0.5`` (OCR: ``delay 75, rate 0.0075, max 0.999``);
    AWM's lagged copy: ``rate 0.001, max 0.3``.  So the first update already uses 0.001.
    """

    rate: float = 0.001
    max_decay: float = 0.5
    delay: int = 0

    def decay(self, steps_done: int) -> float:
        if steps_done < self.delay:
            return 0.0
        return min(self.rate * (steps_done - self.delay), self.max_decay)


class LaggedPolicy:
    """The *old* policy as a snapshot of the trainable parameters.

    ``mode="epoch"``: theta frozen when the epoch's rollouts are done (the rollout policy).
    ``mode="ema"``: ``old = d * old + (1 - d) * theta`` with ``d = schedule.decay(steps_done)``,
    either after every optimizer step (:meth:`after_step`) or when the caller says
    (:meth:`ema_update`, e.g. once per epoch as DiffusionNFT and AWM release it).
    ``fresh`` is true while ``old`` equals ``theta`` exactly, so callers can use
    ``sg(theta)`` instead of a second forward pass.
    """

    def __init__(self, policy: Any, mode: Literal["epoch", "ema"], schedule: EMASchedule | None = None):
        self.mode = mode
        self.schedule = schedule or EMASchedule()
        self.params: list[Tensor] = policy.snapshot()
        self.fresh = True

    def begin_epoch(self, policy: Any) -> None:
        if self.mode == "epoch":
            self.params = policy.snapshot()
            self.fresh = True

    def after_step(self, policy: Any, step: int) -> None:
        """After optimizer step ``step`` (the trainer's 0-based count, passed to the schedule
        as is: the first update has decay 0).  The released DiffusionNFT and AWM count from 1
        and update once per epoch; those algorithms call :meth:`ema_update` instead."""
        if self.mode == "epoch":
            self.fresh = False
            return
        self.ema_update(policy, step)

    def ema_update(self, policy: Any, steps_done: int) -> float:
        """``old = d old + (1 - d) theta`` with ``d = schedule.decay(steps_done)``; returns ``d``."""
        decay = self.schedule.decay(steps_done)
        ema_update_(self.params, policy.trainable_parameters(), decay)
        self.fresh = decay == 0.0
        return decay

    @contextlib.contextmanager
    def active(self, policy: Any) -> Iterator[None]:
        """Within this context ``policy.velocity`` is the old policy's (no gradient)."""
        with torch.no_grad(), policy.use_parameters(self.params):
            yield

    def state_dict(self) -> dict:
        """Whole CPU copies (sharded snapshots are gathered: every process must call this)."""
        return {"params": [full_tensor(p.detach()).cpu().clone() for p in self.params], "fresh": self.fresh}

    def load_state_dict(self, state: dict) -> None:
        self.params = [placed_like(s, p) for s, p in zip(state["params"], self.params)]
        self.fresh = bool(state["fresh"])


def sample_times(
    rows: RowRandom,
    *,
    kind: Literal["uniform", "logit_normal"] = "uniform",
    t_min: float = 0.0,
    t_max: float = 1.0,
    device: torch.device | str = "cpu",
    draws: int | None = None,
    stratum: tuple[int, int] | None = None,
) -> Tensor:
    """Training times in ``[t_min, t_max]``, uniform or logit-normal (SD3), one per row
    ``(B,)`` or ``draws`` per row ``(B, draws)``, each row from its own generator.

    ``stratum = (k, K)`` draws the uniform variate from ``[k / K, (k + 1) / K)`` (stratified
    sampling: ``K`` draws of one sample, one per stratum, cover the time range evenly; for
    ``logit_normal`` through the normal quantile, so the strata have equal probability)."""
    shape = () if draws is None else (draws,)
    if kind not in ("uniform", "logit_normal"):
        raise ValueError(f"unknown time sampling '{kind}'")
    if stratum is None:
        u = rows.rand(*shape) if kind == "uniform" else torch.sigmoid(rows.randn(*shape))
    else:
        k, count = stratum
        if not 0 <= k < count:
            raise ValueError(f"stratum {k} of {count} does not exist")
        u = (k + rows.rand(*shape)) / count
        if kind == "logit_normal":
            u = torch.sigmoid(torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
    return (t_min + (t_max - t_min) * u).to(device)


def require_at_least(cfg: Any, bounds: dict[str, float]) -> None:
    """``ConfigError`` "KEY must be >= BOUND" for the first field of ``cfg`` below its bound."""
    from advantageflow.configbase import ConfigError

    for key, bound in bounds.items():
        if not getattr(cfg, key) >= bound:  # also refuses NaN
            raise ConfigError(f"{key} must be >= {bound}")


@dataclass
class TrainingTimes:
    """Where a forward-process loss draws its training times: ``time_sampling`` (``uniform``
    or ``logit_normal``, SD3's) over ``[t_min, t_max]``.  Algorithm configs inherit it."""

    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    t_min: float = 0.0
    t_max: float = 1.0

    def validate(self) -> None:
        from advantageflow.configbase import ConfigError

        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ConfigError("need 0 <= t_min < t_max <= 1")

    def draw_times(self, rows: RowRandom, device: torch.device | str, draws: int | None = None,
                   stratum: tuple[int, int] | None = None) -> Tensor:
        """:func:`sample_times` with these settings: ``(B,)``, or ``(B, draws)``."""
        return sample_times(rows, kind=self.time_sampling, t_min=self.t_min, t_max=self.t_max, device=device,
                            draws=draws, stratum=stratum)


def stratum_edges(count: int, low: int, high: int) -> list[int]:
    """Whole-index edges of ``count`` strata over ``[low, high]`` inclusive: stratum ``j`` is
    ``[e_j, e_{j+1})`` with ``e_j = low + floor(j (high + 1 - low) / count)``.

    AWM's released code rounds the equally spaced edges down to grid indices *before*
    drawing (``linspace(...).long()``), so strata hold whole indices: for 6 strata over 1..11
    they are ``{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}``.  Integer arithmetic here, so
    no edge lands one below an integer through float rounding.
    """
    span = high + 1 - low
    return [low + (j * span) // count for j in range(count + 1)]


def stratified_grid_indices(
    count: int, low: int, high: int, generator: torch.Generator
) -> Tensor:
    """``count`` step indices, one drawn uniformly from each whole-index stratum of
    :func:`stratum_edges` (AWM's timestep draw over the rollout grid): ``(count,)`` long.

    An index of a stratum of ``n`` indices has probability ``1 / n``; indices never repeat
    unless ``count`` exceeds the number of indices (then empty strata give their lower edge).
    """
    edges = torch.tensor(stratum_edges(count, low, high))
    lower, upper = edges[:-1], edges[1:]
    u = torch.rand(count, generator=generator)
    idx = lower + (u * (upper - lower)).long()
    return idx.clamp(low, high)


def noised(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Forward process ``x_t = (1 - t) x0 + t eps`` with ``t`` ``(B,)``."""
    tt = expand_time(t, x0)
    return (1.0 - tt) * x0 + tt * eps


def x0_prediction(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """``f = x_t - t v`` (the clean-sample prediction)."""
    return x_t - expand_time(t, x_t) * v


def scaled_advantages(advantages: Tensor, clip: float) -> Tensor:
    """Advantages ``(B,)`` divided by their clip (AWM / AdvantageFlow): ``[-1, 1]``.  The trainer
    has clipped them to ``[-clip, clip]`` (:func:`advantageflow.config.advantage_clip`: one clip
    per run, the algorithm's ``adv_clip``), so they are not clipped again here."""
    return advantages / clip


def clipped_policy_loss(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(log_ratio)``.

    Args:
        log_ratio: ``(B,)`` ``log pi_theta - log pi_old`` (with gradient through theta).
        advantages: ``(B,)``.
    Returns:
        ``(loss (B,), ratio (B,))``.
    """
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio
