"""ELBO policy gradient, EPG ("Rethinking the design space...", Choi et al., arXiv 2602.04663).

The log-likelihood of a final sample is estimated by the (negative) flow-matching loss, with
the same ``(t, eps)`` draws for theta, old and ref::

    l_pi   = -mean_k ||v_pi(x_{t_k}, t_k) - (eps_k - x0)||^2        (K draws, mean over dims)
    rho    = exp(l_theta - l_old)
    L      = -sg(rho) * A * l_theta + beta * (l_theta - l_ref)
    A      = R - mean_group(R)          (no std: run with ``advantage.std: none``)

The paper's advantage has no standard deviation; a micro-batch need not hold a whole group, so
the loss cannot recompute it: configure the trainer with ``advantage.std: none`` (the shipped
configs do).  ``old`` is theta frozen at the rollouts (``rho = 1`` at the first update).
The K draws are stacked along the batch (one forward of ``K * B``).  Needs final samples only.
No official code; the draw count, time sampling and ``beta`` defaults are ours (see the doc page).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import LaggedPolicy, TrainingTimes, noised, require_at_least
from advantageflow.sampling import SamplerRequest
from advantageflow.types import LossOutput, Rollout, index_cond, mean_flat


def elbo_surrogate(v: Tensor, u: Tensor, draws: int) -> Tensor:
    """``l = -mean_k ||v_k - u_k||^2``: ``(K * B, *S) -> (B,)``, draws stacked draw-major."""
    err = mean_flat((v - u) ** 2)
    return -err.reshape(draws, -1).mean(dim=0)


@dataclass
class EPGLoss:
    """Per-sample EPG loss and parts, each ``(B,)``: ``loss``, ``policy`` (``-sg(rho) A l``),
    ``kl`` (``l_theta - l_ref``), ``rho``."""

    loss: Tensor
    policy: Tensor
    kl: Tensor
    rho: Tensor


def epg_loss(
    l_theta: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    *,
    l_ref: Tensor | None = None,
    beta: float = 0.0,
) -> EPGLoss:
    """``-sg(rho) A l_theta + beta (l_theta - l_ref)`` with ``rho = exp(l_theta - l_old)``.

    Args:
        l_theta: ``(B,)`` theta's ELBO surrogate (with gradient).
        l_old, l_ref: ``(B,)`` the old policy's / reference's at the same draws (constants).
        advantages: ``(B,)`` ``R - mean_group(R)``.
    """
    rho = torch.exp(l_theta.detach() - l_old.detach())
    policy = -rho * advantages.to(l_theta.dtype) * l_theta
    kl = l_theta - l_ref.detach() if l_ref is not None else torch.zeros_like(l_theta)
    return EPGLoss(policy + beta * kl, policy, kl, rho)


class EPG(AlgorithmBase):
    """ELBO policy gradient (see the module docstring).

    Metrics: ``loss/policy``, ``loss/ref_elbo_gap`` (``l_theta - l_ref``), ``stats/rho_mean``,
    ``stats/elbo`` (``l_theta``).
    """

    conventions = {
        "advantage.std": ("none", "EPG's advantage is R - mean_group(R), not divided by a std"),
        "sampler.guidance_scale": (1.0, "EPG samples with ODE rollouts and no CFG"),
    }

    @dataclass
    class Config(TrainingTimes):
        """Hyper-parameters (no official code; defaults are ours, documented).

        Attributes:
            beta: weight of the ELBO-difference KL ``l_theta - l_ref`` (0 skips the ref pass).
            num_draws: ``K`` shared ``(t, eps)`` draws per sample.
            time_sampling: ``uniform`` / ``logit_normal`` over ``[t_min, t_max]``.
        """

        beta: float = 0.0
        num_draws: int = 4

        def validate(self) -> None:
            super().validate()
            require_at_least(self, {"num_draws": 1, "beta": 0})

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg
        self.old = LaggedPolicy(policy, "epoch")

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest()

    def begin_epoch(self, policy: Any) -> None:
        self.old.begin_epoch(policy)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy, x0 = self.cfg, ctx.policy, batch.x0
        k, n = cfg.num_draws, len(batch)
        rows = ctx.row_random(n)
        # Draw-major stacks (draw d of sample i at d * n + i), each sample from its own generator.
        t = cfg.draw_times(rows, x0.device, draws=k).T.reshape(k * n).to(x0.dtype)
        x0_rep = x0.repeat(k, *([1] * (x0.dim() - 1)))
        cond = index_cond(batch.cond, torch.arange(n).repeat(k))
        eps = rows.randn(k, *x0.shape[1:]).transpose(0, 1).reshape(x0_rep.shape).to(x0)
        x_t, u = noised(x0_rep, t, eps), eps - x0_rep
        l_ref = None
        if cfg.beta > 0:
            with torch.no_grad(), policy.reference():
                l_ref = elbo_surrogate(policy.velocity(x_t, t, cond), u, k)
        l_old = None
        if not self.old.fresh:
            with self.old.active(policy):
                l_old = elbo_surrogate(policy.velocity(x_t, t, cond), u, k)
        l_theta = elbo_surrogate(policy.velocity(x_t, t, cond), u, k)
        if l_old is None:  # old == theta: rho = 1 without a second pass
            l_old = l_theta.detach()
        out = epg_loss(l_theta, l_old, batch.advantages, l_ref=l_ref, beta=cfg.beta)
        yield LossOutput(
            out.loss.mean(),
            {
                "loss/policy": float(out.policy.detach().mean()),
                "loss/ref_elbo_gap": float(out.kl.detach().mean()),
                "stats/rho_mean": float(out.rho.detach().mean()),
                "stats/elbo": float(l_theta.detach().mean()),
            },
        )

    def after_step(self, policy: Any, step: int) -> None:
        self.old.after_step(policy, step)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
