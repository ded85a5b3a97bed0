"""Advantage Weighted Matching, AWM (Xue et al., arXiv 2509.25050; code scxue/advantage_weighted_matching).

AWM replaces Flow-GRPO's per-step Gaussian likelihood by the pretraining flow-matching loss on
the rollout's final sample.  Per sample ``i`` and timestep draw ``k`` (fresh ``eps``)::

    m_ik  = ||v_theta(x_t, t) - (eps - x0)||^2                    (mean over dimensions)
    LP_ik = -w(t) * m_ik        w: uniform / t / t^2, or a robust form (float64):
            ghuber: -t ((m + 1e-10)^p - (1e-10)^p) / p,  p = 0.25   (the released configs')
            huber:  -t (sqrt(m + 1e-10) - 1e-5)                     (the released square root)
    ratio = exp(LP - sg(LP_old))                                  (PPO-style, clipped 1 +- clip)
    L     = max(-A ratio, -A clip(ratio)) + beta ||v_theta - v_ref||^2 + beta_ema ||v_theta - v_ema||^2

with ``A`` clipped to +-5 then divided by 5, the clip range 1 of every released config, and,
as released, no ``v_ema`` term when ``beta = 0``.  ``LP_old`` (``policy_mode``): ``on_policy``
(released) scores theta as it was at the epoch's rollouts, which is ``sg(LP)`` (ratio 1)
during the epoch's first optimizer step; ``every_step`` takes ``sg(LP)`` always;
``off_policy`` (released) rolls out with the lagged copy and scores it.  ``v_ema`` comes from
the lagged copy ``ema = d ema + (1 - d) theta``, ``d = min(0.3, 0.001 n)``, updated once per
epoch after its optimizer steps (``n`` = optimizer steps so far, from 1).  Timesteps: ``K``
(default 6) drawn one per whole-index stratum of the indices 1..11 of a 14-step grid (scaled
to the rollout grid), shared by the optimizer step's samples.  Rollouts: the stochastic
SA-Solver (``tau = 0.4`` for ``t`` in ``[0.3, 0.9]``; 0 for PickScore).  Needs final samples only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import (
    EMASchedule,
    LaggedPolicy,
    clipped_policy_loss,
    noised,
    scaled_advantages,
    stratified_grid_indices,
)
from advantageflow.sampling import SamplerRequest
from advantageflow.types import LossOutput, Rollout, mean_flat

Weighting = Literal["uniform", "t", "t2", "huber", "ghuber"]
HUBER_DELTA = 1e-10


def awm_log_likelihood(mse: Tensor, t: Tensor, weighting: Weighting = "ghuber", p: float = 0.25) -> Tensor:
    """AWM's "log-likelihood" ``LP = -w(t) m`` per sample, in float64: ``(B,)``.

    Args:
        mse: ``(B,)`` flow-matching error ``m = ||v_theta - u||^2`` (mean over dimensions).
        t: ``(B,)`` the times the errors were measured at.
        weighting: ``uniform`` (``-m``), ``t`` (``-t m``), ``t2`` (``-t^2 m``), ``ghuber``:
            ``-t ((m + 1e-10)^p - 1e-10^p) / p`` (the released configs', ``p = 0.25``), or
            ``huber``: ``-t (sqrt(m + 1e-10) - 1e-5)`` (the released square-root form; it is
            ``ghuber`` at ``p = 1/2`` divided by 2, i.e. without the ``1/p``).
    """
    m, tt = mse.double(), t.double().to(mse.device)
    if weighting == "uniform":
        return -m
    if weighting == "t":
        return -tt * m
    if weighting == "t2":
        return -(tt**2) * m
    if weighting == "ghuber":
        return -tt * ((m + HUBER_DELTA) ** p - HUBER_DELTA**p) / p
    if weighting == "huber":
        return -tt * (torch.sqrt(m + HUBER_DELTA) - math.sqrt(HUBER_DELTA))
    raise ValueError(f"unknown AWM weighting '{weighting}' (uniform, t, t2, huber, ghuber)")


@dataclass
class AWMLoss:
    """Per-sample AWM loss and its parts, each ``(B,)``.

    Attributes:
        loss: total per-sample loss (float32 or the velocity's dtype).
        policy: ``max(-A r, -A clip(r))`` (float64).
        log_likelihood: ``LP`` (float64).  ratio: ``exp(LP - LP_old)``.
        reg_ref, reg_ema: ``||v_theta - v_ref||^2`` and ``||v_theta - v_ema||^2`` (zeros if absent).
    """

    loss: Tensor
    policy: Tensor
    log_likelihood: Tensor
    ratio: Tensor
    reg_ref: Tensor
    reg_ema: Tensor


def awm_loss(
    v_theta: Tensor,
    u: Tensor,
    t: Tensor,
    advantages: Tensor,
    *,
    lp_old: Tensor | None = None,
    v_ref: Tensor | None = None,
    v_ema: Tensor | None = None,
    weighting: Weighting = "ghuber",
    p: float = 0.25,
    clip_range: float = 1.0,
    beta: float = 0.0,
    beta_ema: float = 0.0,
) -> AWMLoss:
    """AWM's per-sample loss (module docstring).

    Args:
        v_theta: ``(B, *S)`` theta's velocity at ``x_t`` (with gradient).
        u: ``(B, *S)`` target ``eps - x0``.
        t: ``(B,)`` times.
        advantages: ``(B,)`` already scaled (AWM: clipped to +-5 and divided by 5).
        lp_old: ``(B,)`` the old policy's ``LP`` at the same ``(t, eps)``; ``None`` means
            ``LP_old = sg(LP)`` (ratio 1).
        v_ref, v_ema: ``(B, *S)`` reference / lagged-copy velocities (constants), or ``None``.
    """
    mse = mean_flat((v_theta - u) ** 2)
    lp = awm_log_likelihood(mse, t, weighting, p)
    old = lp.detach() if lp_old is None else lp_old.detach().double()
    policy, ratio = clipped_policy_loss(lp - old, advantages, clip_range)
    zeros = torch.zeros_like(mse)
    reg_ref = mean_flat((v_theta - v_ref.detach()) ** 2) if v_ref is not None else zeros
    reg_ema = mean_flat((v_theta - v_ema.detach()) ** 2) if v_ema is not None else zeros
    loss = policy.to(mse.dtype) + beta * reg_ref + beta_ema * reg_ema
    return AWMLoss(loss, policy, lp, ratio, reg_ref, reg_ema)


def scaled_grid_range(grid_steps: int, low: int, high: int, reference_steps: int) -> tuple[int, int]:
    """Map AWM's index range ``[low, high]`` of a ``reference_steps`` grid onto ``grid_steps``.

    Indices are rounded proportionally and kept inside ``[0, grid_steps - 1]`` (a step index).
    """
    scale = grid_steps / reference_steps
    lo = min(max(round(low * scale), 0), grid_steps - 1)
    hi = min(max(round(high * scale), lo), grid_steps - 1)
    return lo, hi


class AWM(AlgorithmBase):
    """Advantage Weighted Matching (see the module docstring).

    Metrics: ``loss/policy``, ``loss/ref_velocity_mse`` (``||v - v_ref||^2``), ``loss/ema_velocity_mse``,
    ``stats/ratio_mean``, ``stats/clipfrac``, ``stats/velocity_mse``, ``stats/t_mean``.
    """

    clip_key = "adv_clip"  # the run's advantage clip (advantage.clip: unset or equal)

    conventions = {
        "sampler.guidance_scale": (1.0, "AWM's rollouts and evaluation use no CFG"),
        "train.steps_per_epoch": (1, "AWM takes one optimizer step per epoch"),
    }

    @dataclass
    class Config:
        """Hyper-parameters; defaults are the authors' (SD3.5-M, GenEval).

        Attributes:
            weighting: ``ghuber`` (default, the released configs'), ``huber`` (square root),
                ``uniform``, ``t`` or ``t2``.
            huber_p: the generalised-Huber exponent ``p`` (``ghuber`` only).
            adv_clip: the run's advantage clip (the trainer clips to +-adv_clip; ``advantage.clip``
                unset or equal); the loss divides the advantages by it.
            clip_range: the PPO ratio clip (1 in every released config).
            policy_mode: ``on_policy`` (released: ``LP_old`` from theta at the rollouts, i.e.
                ``sg(LP)`` during the epoch's first optimizer step), ``every_step``
                (``LP_old = sg(LP)`` always: ratio 1) or ``off_policy`` (released: roll out
                with the lagged copy and score it as ``LP_old``).
            beta: weight of ``||v - v_ref||^2`` (0.001 GenEval, 0.003 OCR, 1e-4 PickScore);
                0 also drops the ``v_ema`` term, as released.
            beta_ema: weight of ``||v - v_ema||^2``.
            ema_rate, ema_max_decay: the lagged copy's decay ``min(max, rate * n)``.
            ema_update: ``epoch`` (released: once, after the epoch's optimizer steps) or
                ``step`` (after every optimizer step).
            num_timesteps: ``K`` stratified timesteps per optimizer step.
            timestep_low, timestep_high, reference_steps: the index range (inclusive) on a
                ``reference_steps``-step grid, scaled to the rollout grid (PickScore: 0..11).
            solver: rollout solver (``sa_solver`` as released; any ``sampler.solver`` name).
            sa_tau, sa_tau_window: SA-Solver stochasticity (0.4 on ``[0.3, 0.9]`` for GenEval
                and OCR; 0 for PickScore).
        """

        weighting: Weighting = "ghuber"
        huber_p: float = 0.25
        adv_clip: float = 5.0
        clip_range: float = 1.0
        policy_mode: Literal["on_policy", "every_step", "off_policy"] = "on_policy"
        beta: float = 0.001
        beta_ema: float = 1.0
        ema_rate: float = 0.001
        ema_max_decay: float = 0.3
        ema_update: Literal["epoch", "step"] = "epoch"
        num_timesteps: int = 6
        timestep_low: int = 1
        timestep_high: int = 11
        reference_steps: int = 14
        solver: Literal["euler", "heun", "dpmpp_2m", "sa_solver"] = "sa_solver"
        sa_tau: float = 0.4
        sa_tau_window: list[float] = field(default_factory=lambda: [0.3, 0.9])

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            if self.num_timesteps < 1:
                raise ConfigError("num_timesteps must be >= 1")
            if not 0 <= self.timestep_low <= self.timestep_high < self.reference_steps:
                raise ConfigError("need 0 <= timestep_low <= timestep_high < reference_steps")
            if self.huber_p <= 0:
                raise ConfigError("huber_p must be > 0")
            if self.adv_clip <= 0 or self.clip_range < 0:
                raise ConfigError("adv_clip must be > 0 and clip_range >= 0")
            if self.beta < 0 or self.beta_ema < 0:
                raise ConfigError("beta and beta_ema must be >= 0")
            if self.sa_tau < 0 or len(self.sa_tau_window) != 2:
                raise ConfigError("sa_tau must be >= 0 and sa_tau_window a pair [lo, hi]")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        self.ema = LaggedPolicy(policy, "ema", EMASchedule(cfg.ema_rate, cfg.ema_max_decay))
        self.old = LaggedPolicy(policy, "epoch") if cfg.policy_mode == "on_policy" else None
        # As released, beta = 0 also drops the lagged-copy term.
        self.beta_ema = cfg.beta_ema if cfg.beta > 0 else 0.0

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        cfg = self.cfg
        return SamplerRequest(solver=cfg.solver, sa_tau=cfg.sa_tau, sa_tau_window=tuple(cfg.sa_tau_window))

    def rollout_policy(self, policy: Any):
        """``off_policy`` rolls out with the lagged copy (as released); else theta."""
        if self.cfg.policy_mode == "off_policy" and not self.ema.fresh:
            return self.ema.active(policy)
        return contextlib.nullcontext()

    def begin_epoch(self, policy: Any) -> None:
        if self.old is not None:
            self.old.begin_epoch(policy)

    def timestep_indices(self, grid: Tensor, generator: torch.Generator) -> Tensor:
        """``(K,)`` step indices into ``grid``, shared by the optimizer step's batch (drawn from
        the step's generator, so every micro-batch and process trains the same timesteps)."""
        cfg = self.cfg
        lo, hi = scaled_grid_range(len(grid) - 1, cfg.timestep_low, cfg.timestep_high, cfg.reference_steps)
        return stratified_grid_indices(cfg.num_timesteps, lo, hi, generator)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy, x0 = self.cfg, ctx.policy, batch.x0
        adv = scaled_advantages(batch.advantages, cfg.adv_clip).to(x0.dtype)
        indices = self.timestep_indices(batch.grid, ctx.generator)
        rows = ctx.row_random(len(batch))
        for idx in indices.tolist():
            t = torch.full((len(batch),), float(batch.grid[idx]), device=x0.device, dtype=x0.dtype)
            eps = rows.randn(*x0.shape[1:]).to(x0)
            x_t = noised(x0, t, eps)
            u = eps - x0
            # Constants first (no gradient), then theta's graph: see models/base.py.
            v_ref = v_ema = lp_old = None
            if cfg.beta > 0:
                with torch.no_grad(), policy.reference():
                    v_ref = policy.velocity(x_t, t, batch.cond)
            if self.beta_ema > 0 and not self.ema.fresh:
                with self.ema.active(policy):
                    v_ema = policy.velocity(x_t, t, batch.cond)
            old = self.ema if cfg.policy_mode == "off_policy" else self.old
            if old is not None and not old.fresh:
                if old is self.ema and v_ema is not None:
                    v_old = v_ema
                else:
                    with old.active(policy):
                        v_old = policy.velocity(x_t, t, batch.cond)
                lp_old = awm_log_likelihood(mean_flat((v_old - u) ** 2), t, cfg.weighting, cfg.huber_p)
            v_theta = policy.velocity(x_t, t, batch.cond)
            if self.beta_ema > 0 and v_ema is None:  # ema == theta: sg(v_theta), zero gradient
                v_ema = v_theta.detach()
            out = awm_loss(
                v_theta, u, t, adv, lp_old=lp_old, v_ref=v_ref, v_ema=v_ema,
                weighting=cfg.weighting, p=cfg.huber_p, clip_range=cfg.clip_range,
                beta=cfg.beta, beta_ema=self.beta_ema,
            )
            clipped = ((out.ratio - 1.0).abs() > cfg.clip_range).double()
            yield LossOutput(
                out.loss.mean() / len(indices),
                {
                    "loss/policy": float(out.policy.detach().mean()),
                    "loss/ref_velocity_mse": float(out.reg_ref.detach().mean()),
                    "loss/ema_velocity_mse": float(out.reg_ema.detach().mean()),
                    "stats/ratio_mean": float(out.ratio.detach().mean()),
                    "stats/clipfrac": float(clipped.mean()),
                    "stats/velocity_mse": float(mean_flat((v_theta.detach() - u) ** 2).mean()),
                    "stats/t_mean": float(t.mean()),
                },
            )

    def after_step(self, policy: Any, step: int) -> None:
        if self.cfg.ema_update == "step":
            self.ema.ema_update(policy, step + 1)
        if self.old is not None:
            self.old.after_step(policy, step)

    def end_epoch(self, policy: Any, steps_done: int) -> None:
        if self.cfg.ema_update == "epoch":
            self.ema.ema_update(policy, steps_done)

    def state_dict(self) -> dict:
        state = {"ema": self.ema.state_dict()}
        if self.old is not None:
            state["old"] = self.old.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        if self.old is not None and "old" in state:
            self.old.load_state_dict(state["old"])
