"""AdvantageFlow: advantage-weighted forward-process least squares with rollout-policy
regularisation (Kveton, Rao, Mukherjee, Singh, Lai; arXiv 2605.26013).

The paper's full text was not available to us; we implement the form that MeanFlowAdvantage
(Eq. 2) quotes for it, per sample and per draw ``(t, eps)``::

    l = A ||f_theta - x0||^2 + gamma ||f_theta - sg(f_old)||^2 + lambda ||f_theta - sg(f_ref)||^2

with ``f = x_t - t v`` (clean-sample prediction), ``x_t = (1 - t) x0 + t eps`` built from the
rollout's final sample ``x0``, and all three predictions at the same ``(t, eps)``.  The loss is
strictly convex in ``f_theta`` when ``A + gamma + lambda > 0``; its per-sample minimiser is
``(A x0 + gamma f_old + lambda f_ref) / (A + gamma + lambda)`` (:func:`per_sample_minimiser`).
Only final samples are needed, so rollouts use any ODE solver.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.algorithms.base import SamplerRequest, TrainContext
from advantageflow.algorithms.common import (
    EMASchedule,
    LaggedPolicy,
    noised,
    sample_times,
    scaled_advantages,
    x0_prediction,
)
from advantageflow.seeding import RowRandom
from advantageflow.types import LossOutput, Rollout, mean_flat


def advantageflow_loss(
    f_theta: Tensor,
    x0: Tensor,
    f_old: Tensor,
    f_ref: Tensor | None,
    advantages: Tensor,
    gamma: float,
    lambda_ref: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample AdvantageFlow loss ``(B,)`` and its three terms (each ``(B,)``).

    Args:
        f_theta: ``(B, *S)`` theta's clean-sample prediction (with gradient).
        x0: ``(B, *S)`` the rollouts' final samples.
        f_old: ``(B, *S)`` the old policy's prediction (treated as constant).
        f_ref: ``(B, *S)`` the reference's prediction, or ``None`` when ``lambda_ref = 0``.
        advantages: ``(B,)`` scaled advantages ``A``.
    """
    fit = mean_flat((f_theta - x0) ** 2)
    anchor_old = mean_flat((f_theta - f_old.detach()) ** 2)
    anchor_ref = (
        mean_flat((f_theta - f_ref.detach()) ** 2) if f_ref is not None else torch.zeros_like(fit)
    )
    loss = advantages * fit + gamma * anchor_old + lambda_ref * anchor_ref
    return loss, {"fit": fit, "anchor_old": anchor_old, "anchor_ref": anchor_ref}


def per_sample_minimiser(
    x0: Tensor, f_old: Tensor, f_ref: Tensor, advantages: Tensor, gamma: float, lambda_ref: float
) -> Tensor:
    """The minimiser over ``f`` of the per-sample loss: ``(A x0 + g f_old + l f_ref) / (A + g + l)``."""
    a = advantages.reshape(-1, *([1] * (x0.dim() - 1)))
    return (a * x0 + gamma * f_old + lambda_ref * f_ref) / (a + gamma + lambda_ref)


class AdvantageFlow:
    """The AdvantageFlow algorithm (see the module docstring)."""

    @dataclass
    class Config:
        """Hyper-parameters; defaults are the settings the follow-up paper quotes.

        Attributes:
            gamma: weight of the anchor to the old (rollout) policy; ``> 1`` keeps every
                per-sample problem convex for ``A`` in ``[-1, 1]``.
            lambda_ref: weight of the anchor to the frozen reference (0 skips its pass).
            adv_clip: advantages are clipped to ``±adv_clip`` and divided by it.
            adaptive_weight: DiffusionNFT's per-sample weight ``1 / sg(mean|f - x0|)``.
            old_policy: ``epoch`` (theta frozen at the rollouts) or ``ema``.
            ema_rate, ema_max_decay, ema_delay: the EMA schedule when ``old_policy: ema``.
            draws_per_sample: independent ``(t, eps)`` draws per sample and update.
            time_sampling: ``uniform`` / ``logit_normal`` over ``[t_min, t_max]``, or
                ``grid``: the rollout grid's own times.
        """

        gamma: float = 1.1
        lambda_ref: float = 1e-3
        adv_clip: float = 5.0
        adaptive_weight: bool = True
        old_policy: Literal["epoch", "ema"] = "epoch"
        ema_rate: float = 0.001
        ema_max_decay: float = 0.5
        ema_delay: int = 0
        draws_per_sample: int = 1
        time_sampling: Literal["uniform", "logit_normal", "grid"] = "uniform"
        t_min: float = 0.0
        t_max: float = 1.0

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            if self.gamma + self.lambda_ref <= 1.0:
                warnings.warn(
                    f"advantageflow: gamma + lambda_ref = {self.gamma + self.lambda_ref} <= 1, so "
                    "samples with advantage near -1 make the loss non-convex (unstable)",
                    stacklevel=2,
                )
            if self.draws_per_sample < 1:
                raise ConfigError("draws_per_sample must be >= 1")
            if not 0.0 <= self.t_min < self.t_max <= 1.0:
                raise ConfigError("need 0 <= t_min < t_max <= 1")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        schedule = EMASchedule(cfg.ema_rate, cfg.ema_max_decay, cfg.ema_delay)
        self.old = LaggedPolicy(policy, cfg.old_policy, schedule)

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest()

    def begin_epoch(self, policy: Any) -> None:
        self.old.begin_epoch(policy)

    def _times(self, batch: Rollout, rows: RowRandom) -> Tensor:
        """``(B,)`` training times, one per sample from its own generator."""
        cfg = self.cfg
        if cfg.time_sampling == "grid":
            times = batch.grid[:-1]
            return times[rows.randint(len(times))].to(batch.x0.device, batch.x0.dtype)
        return sample_times(
            rows, kind=cfg.time_sampling, t_min=cfg.t_min, t_max=cfg.t_max, device=batch.x0.device,
        ).to(batch.x0.dtype)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy = self.cfg, ctx.policy
        adv = scaled_advantages(batch.advantages, cfg.adv_clip).to(batch.x0.dtype)
        rows = ctx.row_random(len(batch))
        for _ in range(cfg.draws_per_sample):
            t = self._times(batch, rows)
            eps = rows.randn(*batch.x0.shape[1:]).to(batch.x0)
            x_t = noised(batch.x0, t, eps)
            # Anchors first (no gradient), then theta's graph: see models/base.py.
            f_ref = None
            if cfg.lambda_ref > 0:
                with torch.no_grad(), policy.reference():
                    f_ref = x0_prediction(x_t, t, policy.velocity(x_t, t, batch.cond))
            f_old = None
            if not self.old.fresh:
                with self.old.active(policy):
                    f_old = x0_prediction(x_t, t, policy.velocity(x_t, t, batch.cond))
            f_theta = x0_prediction(x_t, t, policy.velocity(x_t, t, batch.cond))
            if f_old is None:  # theta == old: sg(f_theta) costs no extra pass
                f_old = f_theta.detach()
            per_sample, terms = advantageflow_loss(
                f_theta, batch.x0, f_old, f_ref, adv, cfg.gamma, cfg.lambda_ref
            )
            if cfg.adaptive_weight:
                scale = mean_flat((f_theta - batch.x0).abs()).detach().clamp_min(1e-5)
                per_sample = per_sample / scale
            loss = per_sample.mean() / cfg.draws_per_sample
            yield LossOutput(
                loss,
                {
                    "loss/policy": float((adv * terms["fit"]).mean().detach()),
                    "loss/anchor_old": float(terms["anchor_old"].mean().detach()),
                    "loss/anchor_ref": float(terms["anchor_ref"].mean().detach()),
                    "stats/fm_mse": float(terms["fit"].mean().detach()),
                },
            )

    def after_step(self, policy: Any, step: int) -> None:
        self.old.after_step(policy, step)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
