"""DiffusionNFT: online diffusion RL on the forward process (Zheng et al., arXiv 2509.16117;
code NVlabs/DiffusionNFT).

Likelihood-free and CFG-free.  With the optimality probability
``r = clamp(clip(A, -5, 5) / 5 / 2 + 0.5, 0, 1)`` and the implicit positive / negative
policies built from theta and the (stop-gradient) old policy::

    v+ = beta v_theta + (1 - beta) sg(v_old)        v- = (1 + beta) sg(v_old) - beta v_theta
    x0+ = x_t - t v+                                 x0- = x_t - t v-
    l+  = ||x0+ - x0||^2 / sg(max(mean|x0+ - x0|, 1e-5))      (adaptive weight), likewise l-
    L   = mean((r l+ + (1 - r) l-) / beta) * 5 + 1e-4 ||v_theta - v_ref||^2

(the factor 5 is the advantage clip of the released code).  Timesteps: the rollout grid's own
step times, permuted per sample, ``int(0.99 N)`` of them per update.  The old policy is an EMA
of theta, ``old = eta old + (1 - eta) theta``, updated once per epoch after the epoch's
optimizer steps with ``eta = min(0.001 n, 0.5)``, ``n`` the optimizer steps taken so far
counted from 1 (OCR: 0 while ``n < 75``, then ``min(0.0075 (n - 75), 0.999)``); the rollouts
are sampled with the old policy.  Both as released (``old_update: epoch``,
``rollout_policy: old``); ``old_update: step`` / ``rollout_policy: theta`` are our earlier
variant.  Rollouts: DPM-Solver++(2M), no CFG.  Needs final samples only.

Gradient identity (docs/algorithms/README.md, "How the methods relate"; tested): with unit
adaptive weights,
``x0+/- - x0 = t (u - v+/-)`` and the loss has the gradient of
``t^2 [A_c ||v_theta - u||^2 + (5 beta - A_c) ||v_theta - v_old||^2]`` with
``A_c = clip(A, -5, 5)`` (the clipped, not rescaled, advantage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import EMASchedule, LaggedPolicy, noised, x0_prediction
from advantageflow.sampling import SamplerRequest
from advantageflow.seeding import RowRandom
from advantageflow.types import LossOutput, Rollout, mean_flat

EMA_SCHEDULES = {
    "default": EMASchedule(rate=0.001, max_decay=0.5, delay=0),
    "ocr": EMASchedule(rate=0.0075, max_decay=0.999, delay=75),
}


def optimality_probability(advantages: Tensor, adv_clip: float = 5.0) -> Tensor:
    """``r = clamp(A / c / 2 + 0.5, 0, 1)``: ``(B,) -> (B,)``; the released
    ``clamp(clip(A, -c, c) / c / 2 + 0.5, 0, 1)`` without its inner clip, which the outer one
    makes redundant (and the trainer has clipped ``A`` to ``±c``)."""
    return (advantages / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


@dataclass
class NFTLoss:
    """Per-sample DiffusionNFT loss and parts, each ``(B,)``.

    Attributes:
        loss: total.  policy: ``(r l+ + (1 - r) l-) / beta * scale``.
        positive, negative: ``l+`` and ``l-`` (weighted).  reg_ref: ``||v - v_ref||^2``.
    """

    loss: Tensor
    policy: Tensor
    positive: Tensor
    negative: Tensor
    reg_ref: Tensor


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    r: Tensor,
    beta: float,
    *,
    v_ref: Tensor | None = None,
    ref_weight: float = 1e-4,
    scale: float = 5.0,
    adaptive_weight: bool = True,
) -> NFTLoss:
    """DiffusionNFT's per-sample loss (module docstring).

    Args:
        v_theta: ``(B, *S)`` theta's velocity at ``x_t`` (with gradient).
        v_old: ``(B, *S)`` the old policy's velocity (treated as constant).
        x_t: ``(B, *S)`` noised rollouts; x0: ``(B, *S)`` the rollouts; t: ``(B,)``.
        r: ``(B,)`` optimality probabilities in ``[0, 1]``.
        beta: the implicit-policy strength.
        v_ref: ``(B, *S)`` the reference's velocity (constant) or ``None`` (no penalty).
        scale: the released code's factor (its advantage clip, 5).
        adaptive_weight: divide each squared error by ``sg(max(mean|err|, 1e-5))``.
    """
    v_old = v_old.detach()
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta

    def weighted(v: Tensor) -> Tensor:
        err = x0_prediction(x_t, t, v) - x0
        sq = mean_flat(err**2)
        if adaptive_weight:
            sq = sq / mean_flat(err.detach().double().abs()).clamp_min(1e-5).to(sq.dtype)
        return sq

    positive, negative = weighted(v_pos), weighted(v_neg)
    r = r.to(positive.dtype)
    policy = (r * positive + (1.0 - r) * negative) / beta * scale
    reg_ref = mean_flat((v_theta - v_ref.detach()) ** 2) if v_ref is not None else torch.zeros_like(policy)
    return NFTLoss(policy + ref_weight * reg_ref, policy, positive, negative, reg_ref)


class DiffusionNFT(AlgorithmBase):
    """DiffusionNFT (see the module docstring).

    Metrics: ``loss/policy``, ``loss/ref_velocity_mse`` (``||v - v_ref||^2``), ``loss/positive``,
    ``loss/negative``, ``stats/r_mean``, ``stats/old_decay``.
    """

    clip_key = "adv_clip"  # the run's advantage clip (advantage.clip: unset or equal)

    conventions = {
        "sampler.guidance_scale": (1.0, "DiffusionNFT is CFG-free: rollouts with guidance 1"),
        "train.steps_per_epoch": (1, "DiffusionNFT takes one optimizer step per epoch (GenEval, PickScore)"),
    }

    @dataclass
    class Config:
        """Hyper-parameters; defaults are the authors' (GenEval / PickScore).

        Attributes:
            beta: implicit-policy strength (1.0 GenEval/PickScore, 0.1 OCR/multi-reward).
            adv_clip: the run's advantage clip (the trainer clips to +-adv_clip; ``advantage.clip``
                unset or equal); also the loss factor (5 in the released code).
            ref_weight: weight of ``||v_theta - v_ref||^2`` (1e-4).
            adaptive_weight: the x0-space adaptive weighting.
            timestep_fraction: ``int(fraction * N)`` grid steps per update.
            ema_schedule: old-policy EMA: ``default`` (``min(0.001 n, 0.5)``) or ``ocr``
                (0 while ``n < 75``, then ``min(0.0075 (n - 75), 0.999)``); ``n`` = optimizer
                steps taken, counted from 1.
            old_update: ``epoch`` (released: once, after the epoch's optimizer steps) or
                ``step`` (after every optimizer step).
            rollout_policy: sample the rollouts with the ``old`` policy (released) or ``theta``.
            solver: rollout ODE solver (DPM-Solver++(2M) in the paper; no CFG: keep
                ``sampler.guidance_scale: 1``).
        """

        beta: float = 1.0
        adv_clip: float = 5.0
        ref_weight: float = 1e-4
        adaptive_weight: bool = True
        timestep_fraction: float = 0.99
        ema_schedule: Literal["default", "ocr"] = "default"
        old_update: Literal["epoch", "step"] = "epoch"
        rollout_policy: Literal["old", "theta"] = "old"
        solver: Literal["euler", "heun", "dpmpp_2m"] = "dpmpp_2m"

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            if self.beta <= 0:
                raise ConfigError("beta must be > 0 (the loss divides by it)")
            if self.adv_clip <= 0 or self.ref_weight < 0:
                raise ConfigError("adv_clip must be > 0 and ref_weight >= 0")
            if not 0.0 < self.timestep_fraction <= 1.0:
                raise ConfigError("timestep_fraction must be in (0, 1]")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        self.schedule = EMA_SCHEDULES[cfg.ema_schedule]
        self.old = LaggedPolicy(policy, "ema", self.schedule)
        self.last_decay = 0.0

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest(solver=self.cfg.solver)

    def begin_epoch(self, policy: Any) -> None:
        pass

    def rollout_policy(self, policy: Any):
        """The weights the trainer samples the epoch's rollouts with: the old policy (as
        released) unless it still equals theta or ``rollout_policy: theta``."""
        if self.cfg.rollout_policy == "theta" or self.old.fresh:
            return contextlib.nullcontext()
        return self.old.active(policy)

    def timesteps(self, batch: Rollout, rows: RowRandom) -> Tensor:
        """``(T, B)`` times: per sample a random permutation of the grid's ``N`` step times,
        truncated to ``T = max(1, int(timestep_fraction * N))``."""
        times = batch.grid[:-1]
        n = len(times)
        count = max(1, int(self.cfg.timestep_fraction * n))
        perms = rows.randperm(n).T  # (N, B)
        return times[perms[:count]].to(batch.x0.device, batch.x0.dtype)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy, x0 = self.cfg, ctx.policy, batch.x0
        r = optimality_probability(batch.advantages, cfg.adv_clip).to(x0.dtype)
        rows = ctx.row_random(len(batch))
        all_t = self.timesteps(batch, rows)
        for t in all_t:
            eps = rows.randn(*x0.shape[1:]).to(x0)
            x_t = noised(x0, t, eps)
            v_ref = None
            if cfg.ref_weight > 0:
                with torch.no_grad(), policy.reference():
                    v_ref = policy.velocity(x_t, t, batch.cond)
            v_old = None
            if not self.old.fresh:
                with self.old.active(policy):
                    v_old = policy.velocity(x_t, t, batch.cond)
            v_theta = policy.velocity(x_t, t, batch.cond)
            if v_old is None:  # old == theta: sg(v_theta) costs no extra pass
                v_old = v_theta.detach()
            out = nft_loss(
                v_theta, v_old, x_t, x0, t, r, cfg.beta, v_ref=v_ref, ref_weight=cfg.ref_weight,
                scale=cfg.adv_clip, adaptive_weight=cfg.adaptive_weight,
            )
            yield LossOutput(
                out.loss.mean() / len(all_t),
                {
                    "loss/policy": float(out.policy.detach().mean()),
                    "loss/ref_velocity_mse": float(out.reg_ref.detach().mean()),
                    "loss/positive": float(out.positive.detach().mean()),
                    "loss/negative": float(out.negative.detach().mean()),
                    "stats/r_mean": float(r.detach().mean()),
                    "stats/old_decay": self.last_decay,
                },
            )

    def after_step(self, policy: Any, step: int) -> None:
        if self.cfg.old_update == "step":
            self.last_decay = self.old.ema_update(policy, step + 1)

    def end_epoch(self, policy: Any, steps_done: int) -> None:
        if self.cfg.old_update == "epoch":
            self.last_decay = self.old.ema_update(policy, steps_done)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict(), "last_decay": self.last_decay}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
        self.last_decay = float(state.get("last_decay", 0.0))
