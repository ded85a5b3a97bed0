"""Flow-GRPO (Liu et al., arXiv 2505.05470; code yifan123/flow_grpo).

Reverse-process RL: the ODE sampler is replaced by an SDE with the same marginals
(:func:`advantageflow.sampling.sde_step`, or the coefficient-preserving
:func:`~advantageflow.sampling.cps_step`), so each sampler step is a Gaussian policy
``N(mu_theta(x_k), std_k^2)`` with a log-probability.  At each trained step ``k``::

    r   = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))      (old: the rollout's)
    L_k = mean( max(-A r, -A clip(r, 1 - e, 1 + e)) ) + beta * KL_k
    KL_k = ||mu_theta - mu_ref||^2 / (2 sig^2 (-D))      (exact Gaussian KL, mean over dims)

``std_k^2 = sig^2 (-D)`` for ``sde`` (``D = s_{k+1} - s_k``) and ``sig^2`` for CPS.  The
released code divides by ``2 sig^2`` only (no step size); ``kl_without_step_size: true``
reproduces it (identical for CPS, whose variance has no step-size factor).  Trained steps:
the first ``int(0.99 N)`` of the ``N``-step rollout ("denoising reduction"), or, in the
"Fast" variant, only the ``w`` SDE steps of a random window lying inside ``fast_window_range``
(ODE elsewhere; the released Fast configs: ``w = 3`` inside the first half, CPS, noise level
0.8, clip 1e-5, beta 0).  CFG: the guided velocity (``ctx.guidance_scale``) is the policy.
Needs the SDE trajectory and its per-step log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import clipped_policy_loss
from advantageflow.sampling import SamplerRequest, SDEStep, cps_step, sde_step
from advantageflow.types import LossOutput, Rollout, mean_flat


def gaussian_kl(mean: Tensor, mean_ref: Tensor, variance: Tensor | float) -> Tensor:
    """``KL(N(mean, var I) || N(mean_ref, var I))`` per dimension, averaged: ``(B,)``.

    Args:
        mean, mean_ref: ``(B, *S)`` the two Gaussians' means (shared isotropic variance).
        variance: scalar (0-d tensor or float) ``var``.
    """
    diff = (mean.float() - mean_ref.float().detach()) ** 2
    return mean_flat(diff) / (2.0 * torch.as_tensor(variance, dtype=torch.float32, device=diff.device))


def flow_grpo_step_loss(
    log_prob: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    clip_range: float,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's per-sample loss at one step: clipped surrogate plus ``beta * KL``.

    Args:
        log_prob: ``(B,)`` ``log p_theta(x_{k+1} | x_k)`` (averaged over dimensions).
        log_prob_old: ``(B,)`` the rollout policy's log-prob of the same transition.
        advantages: ``(B,)``.
        kl: ``(B,)`` KL to the reference at this step, or ``None``.
    Returns:
        ``(loss (B,), ratio (B,))``.
    """
    policy, ratio = clipped_policy_loss(log_prob - log_prob_old.detach(), advantages, clip_range)
    if kl is not None and beta > 0:
        policy = policy + beta * kl
    return policy, ratio


class FlowGRPO(AlgorithmBase):
    """Flow-GRPO (see the module docstring).

    The trainer drops groups whose rewards are all equal (``drop_zero_std_groups``) and logs
    their fraction over the epoch as ``stats/zero_std_ratio``.
    Metrics: ``loss/policy``, ``loss/kl``, ``stats/ratio_mean``, ``stats/clipfrac``.
    """

    clip_key = "adv_clip"  # the run's advantage clip (advantage.clip: unset or equal)
    drop_zero_std_groups = True

    @dataclass
    class Config:
        """Hyper-parameters; defaults are the authors' (SD3.5-M, CFG 4.5).

        Attributes:
            stochastic: ``sde`` (Flow-GRPO's SDE) or ``cps`` (coefficient-preserving).
            noise_level: the SDE noise level ``a``.
            clip_range: ratio clip ``e`` (1e-5 for the Fast configs).
            beta: KL weight (0.04 GenEval / OCR, 0.01 PickScore, 0 Fast).
            kl_without_step_size: divide by ``2 sig^2`` like the released code instead of the
                exact ``2 sig^2 (-D)``.
            adv_clip: the run's advantage clip: the trainer clips advantages to +-adv_clip
                (``advantage.clip`` unset or equal).
            timestep_fraction: train on the first ``int(fraction * N)`` steps.
            fast_window: ``w > 0`` enables Flow-GRPO-Fast: SDE (and training) only on ``w``
                consecutive steps, a window drawn uniformly among those inside
                ``fast_window_range`` (start in ``[lo, hi - w]``, as released).
            fast_window_range: ``[lo, hi)`` step indices the window lies in (the released
                Fast configs use the first half: ``[0, N // 2)``; match it to ``sampler.steps``).
        """

        stochastic: Literal["sde", "cps"] = "sde"
        noise_level: float = 0.7
        clip_range: float = 1e-4
        beta: float = 0.04
        kl_without_step_size: bool = False
        adv_clip: float = 5.0
        timestep_fraction: float = 0.99
        fast_window: int = 0
        fast_window_range: list[int] = field(default_factory=lambda: [0, 5])

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            if not 0.0 < self.noise_level:
                raise ConfigError("noise_level must be > 0 (0 makes the policy deterministic)")
            if self.stochastic == "cps" and self.noise_level > 1.0:
                raise ConfigError("cps needs noise_level <= 1 (sig = s' sin(a pi / 2))")
            if not 0.0 < self.timestep_fraction <= 1.0:
                raise ConfigError("timestep_fraction must be in (0, 1]")
            if self.clip_range < 0 or self.beta < 0 or self.adv_clip <= 0:
                raise ConfigError("clip_range and beta must be >= 0, adv_clip > 0")
            if self.fast_window < 0:
                raise ConfigError("fast_window must be >= 0")
            if self.fast_window:
                if len(self.fast_window_range) != 2:
                    raise ConfigError("fast_window_range must be [lo, hi)")
                lo, hi = self.fast_window_range
                if not 0 <= lo < hi:
                    raise ConfigError("fast_window_range needs 0 <= lo < hi")
                if hi - lo < self.fast_window:
                    raise ConfigError(f"fast_window_range {self.fast_window_range} is narrower than fast_window "
                                      f"{self.fast_window}; widen flow_grpo.fast_window_range")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        self.window: tuple[int, int] | None = None

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        """SDE rollouts with log-probs and the trajectory; Fast: a random window, drawn from
        ``generator`` (so a resumed run draws the same one)."""
        cfg = self.cfg
        window = None
        if cfg.fast_window:
            lo, hi = cfg.fast_window_range
            start = lo + int(torch.randint(hi - lo - cfg.fast_window + 1, (1,), generator=generator))
            window = (start, start + cfg.fast_window)
        self.window = window
        return SamplerRequest(
            stochastic=cfg.stochastic,
            noise_level=cfg.noise_level,
            stochastic_steps=window,
            keep_trajectory=True,
        )

    def begin_epoch(self, policy: Any) -> None:
        pass

    def trained_steps(self, batch: Rollout) -> list[int]:
        """Step indices trained on: stochastic steps (finite log-probs) among the first
        ``int(timestep_fraction * N)``."""
        n = batch.log_probs.shape[1]
        limit = int(self.cfg.timestep_fraction * n)
        stochastic = torch.isfinite(batch.log_probs).all(dim=0).tolist()
        steps = [k for k in range(limit) if stochastic[k]]
        if not steps:
            raise ValueError(
                f"flow_grpo: no stochastic step to train on among the first {limit} of {n} steps "
                "(check fast_window_range against sampler.steps)"
            )
        return steps

    def _step(self, x: Tensor, v: Tensor, x_next: Tensor, grid: list[float], k: int) -> SDEStep:
        s, s_next = grid[k], grid[k + 1]
        if self.cfg.stochastic == "sde":
            return sde_step(x, v, s, s_next, self.cfg.noise_level, s_first=grid[1], x_next=x_next)
        return cps_step(x, v, s, s_next, self.cfg.noise_level, x_next=x_next)

    def _variance(self, step: SDEStep, grid: list[float], k: int) -> Tensor:
        var = step.std.float() ** 2
        if self.cfg.kl_without_step_size and self.cfg.stochastic == "sde":
            var = var / (grid[k] - grid[k + 1])  # sig^2 (-D) / (-D) = sig^2
        return var

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy = self.cfg, ctx.policy
        if batch.trajectory is None or batch.log_probs is None:
            raise ValueError("flow_grpo needs rollouts with a trajectory and log-probs (SDE sampling)")
        grid = [float(s) for s in batch.grid]
        adv = batch.advantages  # clipped to +-adv_clip by the trainer (config.advantage_clip)
        steps = self.trained_steps(batch)
        for k in steps:
            x, x_next = batch.trajectory[:, k], batch.trajectory[:, k + 1]
            t = torch.full((len(batch),), grid[k], device=x.device, dtype=x.dtype)
            kl = None
            if cfg.beta > 0:
                with torch.no_grad(), policy.reference():
                    v_ref = policy.velocity(x, t, batch.cond, guidance_scale=ctx.guidance_scale)
                    ref = self._step(x, v_ref, x_next, grid, k)
            v = policy.velocity(x, t, batch.cond, guidance_scale=ctx.guidance_scale)
            cur = self._step(x, v, x_next, grid, k)
            if cfg.beta > 0:
                kl = gaussian_kl(cur.mean, ref.mean, self._variance(cur, grid, k))
            loss, ratio = flow_grpo_step_loss(
                cur.log_prob, batch.log_probs[:, k], adv, cfg.clip_range, kl=kl, beta=cfg.beta
            )
            clipped = ((ratio.detach() - 1.0).abs() > cfg.clip_range).float()
            surrogate = loss.detach() - (cfg.beta * kl.detach() if kl is not None else 0.0)
            yield LossOutput(
                loss.mean() / len(steps),
                {
                    "loss/policy": float(surrogate.mean()),
                    "loss/kl": float(kl.detach().mean()) if kl is not None else 0.0,
                    "stats/ratio_mean": float(ratio.detach().mean()),
                    "stats/clipfrac": float(clipped.mean()),
                },
            )

    def after_step(self, policy: Any, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"window": list(self.window) if self.window is not None else None}

    def load_state_dict(self, state: dict) -> None:
        window = state.get("window")
        self.window = tuple(window) if window is not None else None
