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

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import (
    EMASchedule,
    LaggedPolicy,
    TrainingTimes,
    noised,
    scaled_advantages,
    x0_prediction,
)
from advantageflow.sampling import SamplerRequest
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


def trust_region_loss(
    f_theta: Tensor, x0: Tensor, f_old: Tensor, f_ref: Tensor | None, advantages: Tensor,
    gamma: float, lambda_ref: float, radius: float,
) -> Tensor:
    """Per-sample ``(B,)`` AdvantageFlow loss with its minimiser kept within ``radius`` of ``f_old``.

    The paper's per-sample loss is the quadratic ``c ||f - f*||^2 + const`` with
    ``c = A + gamma + lambda`` and ``f* =`` :func:`per_sample_minimiser`.  We keep that
    curvature but move the target to ``f_old + s (f* - f_old)``, ``s = min(1, radius /
    rms(f* - f_old))``: one epoch can pull ``f`` at most ``radius`` (root mean square over the
    sample's dimensions) from the rollout policy.  Where no target is moved, the gradient equals
    the paper's exactly (ours, not the paper's: ``advantageflow.target_radius``).

    Args: as :func:`advantageflow_loss`; needs ``A + gamma + lambda > 0`` per sample.
    """
    f_old = f_old.detach()
    anchor = f_old if f_ref is None else f_ref.detach()
    lam = lambda_ref if f_ref is not None else 0.0
    curvature = advantages + gamma + lam
    target = per_sample_minimiser(x0, f_old, anchor, advantages, gamma, lam)
    step = target - f_old
    size = mean_flat(step**2).sqrt()
    shrink = (radius / size.clamp_min(1e-12)).clamp(max=1.0)
    target = f_old + step * shrink.reshape(-1, *([1] * (step.dim() - 1)))
    return curvature * mean_flat((f_theta - target) ** 2)


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty, so every step logs every key)."""
    n = mask.sum()
    return float((values * mask).sum() / n) if bool(n > 0) else 0.0


def diagnostics(
    terms: dict[str, Tensor], adv: Tensor, t: Tensor, weight: Tensor, f_old: Tensor, x0: Tensor,
    anchor_weight: float, first_step: bool,
) -> dict[str, float]:
    """Cheap per-update ``stats/...`` for studying the loss's stability (no extra forward pass).

    ``fit`` (``||f - x0||^2``) split by the sign of ``A`` and by ``t < 1/2``; the adaptive
    weight's mean / min / max; ``|x0|`` (rollouts escaping the data's support); the size of the
    step to the per-sample minimiser, ``|A| / (A + gamma + lambda) * rms(x0 - f_old)``
    (ignoring the small ref anchor), for negative advantages; and, after the first update of an
    epoch, ``rms(f_theta - f_old)``: how far the epoch's updates have moved ``f``.

    Args: terms: :func:`advantageflow_loss`'s ``(B,)`` terms.  adv, t, weight: ``(B,)``.
        f_old, x0: ``(B, *S)``.  anchor_weight: ``gamma + lambda_ref``.
    """
    with torch.no_grad():
        fit, neg, small_t = terms["fit"], (adv < 0).to(adv), (t < 0.5).to(adv)
        to_target = (adv.abs() / (adv + anchor_weight).clamp_min(1e-6)) * mean_flat((x0 - f_old) ** 2).sqrt()
        out = {
            "stats/fit_pos": _masked_mean(fit, 1 - neg),
            "stats/fit_neg": _masked_mean(fit, neg),
            "stats/fit_small_t": _masked_mean(fit, small_t),
            "stats/fit_large_t": _masked_mean(fit, 1 - small_t),
            "stats/fit_max": float(fit.max()),
            "stats/weight_mean": float(weight.mean()),
            "stats/weight_min": float(weight.min()),
            "stats/weight_max": float(weight.max()),
            "stats/x0_absmax": float(x0.abs().max()),
            "stats/neg_target_step": _masked_mean(to_target, neg),
            "stats/neg_fraction": float(neg.mean()),
        }
        if not first_step:
            drift = terms["anchor_old"].sqrt()
            out["stats/old_drift"] = float(drift.mean())
            out["stats/old_drift_neg"] = _masked_mean(drift, neg)
            out["stats/old_drift_pos"] = _masked_mean(drift, 1 - neg)
        return out


class AdvantageFlow(AlgorithmBase):
    """The AdvantageFlow algorithm (see the module docstring)."""

    clip_key = "adv_clip"  # the run's advantage clip (advantage.clip: unset or equal)

    @dataclass
    class Config(TrainingTimes):
        """Hyper-parameters; defaults are the settings the follow-up paper quotes.

        Attributes:
            gamma: weight of the anchor to the old (rollout) policy; ``> 1`` keeps every
                per-sample problem convex for ``A`` in ``[-1, 1]``.
            lambda_ref: weight of the anchor to the frozen reference (0 skips its pass).
            adv_clip: the run's advantage clip (the trainer clips to ``±adv_clip``;
                ``advantage.clip`` unset or equal); the loss divides the advantages by it.
            adaptive_weight: DiffusionNFT's per-sample weight ``1 / sg(mean|f - x0|)``.
            old_policy: ``epoch`` (theta frozen at the rollouts) or ``ema``.
            ema_rate, ema_max_decay, ema_delay: the EMA schedule when ``old_policy: ema``.
            negative_scale: negative advantages are multiplied by this (1: the paper; ours).
            target_radius: > 0 bounds how far one epoch's per-sample target may lie from
                ``f_old`` (:func:`trust_region_loss`; 0: the paper's loss; ours).
            draws_per_sample: independent ``(t, eps)`` draws per sample and update.
            time_sampling: ``uniform`` / ``logit_normal`` over ``[t_min, t_max]``, or
                ``grid``: the rollout grid's own times.
            stratified_times: draw ``k`` of ``draws_per_sample`` takes its time from the
                ``k``-th of as many equal-probability strata (lower-variance gradient; ours).
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
        time_sampling: Literal["uniform", "logit_normal", "grid"] = "uniform"  # + the rollout grid
        # log the stability diagnostics (:func:`diagnostics`); off by default because their
        # subset means and maxima depend on how a step's rows are split into micro-batches and
        # processes, unlike every other metric
        diagnostics: bool = False
        negative_scale: float = 1.0
        target_radius: float = 0.0
        stratified_times: bool = False

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            super().validate()
            if self.gamma + self.lambda_ref <= 1.0:
                warnings.warn(
                    f"advantageflow: gamma + lambda_ref = {self.gamma + self.lambda_ref} <= 1, so "
                    "samples with advantage near -1 make the loss non-convex (unstable)",
                    stacklevel=2,
                )
            if self.negative_scale < 0:
                raise ConfigError("advantageflow.negative_scale must be >= 0")
            if self.target_radius < 0:
                raise ConfigError("advantageflow.target_radius must be >= 0 (0 turns the trust region off)")
            if self.target_radius > 0 and self.gamma + self.lambda_ref - self.negative_scale <= 0:
                raise ConfigError(
                    "advantageflow.target_radius needs gamma + lambda_ref > negative_scale (a convex per-sample loss)"
                )
            if self.draws_per_sample < 1:
                raise ConfigError("draws_per_sample must be >= 1")
            if self.stratified_times and self.time_sampling == "grid":
                raise ConfigError("advantageflow.stratified_times needs time_sampling uniform or logit_normal")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        schedule = EMASchedule(cfg.ema_rate, cfg.ema_max_decay, cfg.ema_delay)
        self.old = LaggedPolicy(policy, cfg.old_policy, schedule)

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest()

    def begin_epoch(self, policy: Any) -> None:
        self.old.begin_epoch(policy)

    def _times(self, batch: Rollout, rows: RowRandom, draw: int) -> Tensor:
        """``(B,)`` training times of draw ``draw``, one per sample from its own generator."""
        cfg = self.cfg
        if cfg.time_sampling == "grid":
            times = batch.grid[:-1]
            return times[rows.randint(len(times))].to(batch.x0.device, batch.x0.dtype)
        stratum = (draw, cfg.draws_per_sample) if cfg.stratified_times else None
        return cfg.draw_times(rows, batch.x0.device, stratum=stratum).to(batch.x0.dtype)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy = self.cfg, ctx.policy
        adv = scaled_advantages(batch.advantages, cfg.adv_clip).to(batch.x0.dtype)
        if cfg.negative_scale != 1.0:
            adv = torch.where(adv < 0, adv * cfg.negative_scale, adv)
        rows = ctx.row_random(len(batch))
        for draw in range(cfg.draws_per_sample):
            t = self._times(batch, rows, draw)
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
            if cfg.target_radius > 0:
                per_sample = trust_region_loss(
                    f_theta, batch.x0, f_old, f_ref, adv, cfg.gamma, cfg.lambda_ref, cfg.target_radius
                )
            weight = torch.ones_like(per_sample)
            if cfg.adaptive_weight:
                scale = mean_flat((f_theta - batch.x0).abs()).detach().clamp_min(1e-5)
                per_sample = per_sample / scale
                weight = 1.0 / scale  # reported only
            loss = per_sample.mean() / cfg.draws_per_sample
            metrics = {
                "loss/policy": float((adv * terms["fit"]).mean().detach()),
                "loss/anchor_old": float(terms["anchor_old"].mean().detach()),
                "loss/anchor_ref": float(terms["anchor_ref"].mean().detach()),
                "stats/x0_mse": float(terms["fit"].mean().detach()),
            }
            if cfg.diagnostics:
                metrics.update(diagnostics(terms, adv, t, weight, f_old, batch.x0, cfg.gamma + cfg.lambda_ref,
                                           first_step=self.old.fresh))
            yield LossOutput(loss, metrics)

    def after_step(self, policy: Any, step: int) -> None:
        self.old.after_step(policy, step)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
