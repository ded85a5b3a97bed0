"""ELBO policy gradient, EPG ("Rethinking the design space...", Choi et al., arXiv 2602.04663).

The log-likelihood of a final sample is estimated by the (negative) flow-matching loss, with
the same ``(t, eps)`` draws for theta, old and ref::

    l_pi   = -mean_k ||v_pi(x_{t_k}, t_k) - (eps_k - x0)||^2        (K draws, mean over dims)
    rho    = exp(l_theta - l_old)
    L      = -sg(rho) * A * l_theta + beta * (l_theta - l_ref)
    A      = R - mean_group(R)          (no std: run with ``advantage.std: none``)

Ours, off by default: ``kl_velocity * mean_k ||v_theta - v_ref||^2`` at the same draws, the
velocity-space KL that Flow-GRPO, AWM and DiffusionNFT anchor to the reference with.  The
paper's loss is unbounded below for negative advantages (``A ||v - u||^2`` with ``A < 0``);
this term makes each sample's loss convex in ``v`` once ``kl_velocity > max |rho A|`` and
bounds how far theta can drift from the reference (docs/algorithms/epg.md, "Stability").
Also ours, off by default: ``negative_margin = m > 0`` stops lowering a negative-advantage
sample's ELBO once it is ``m`` below the reference's (``l_theta < l_ref - m``: that sample's
policy term gets no gradient), a clip of the likelihood ratio to the reference,
``exp(l_theta - l_ref) >= exp(-m)``, on the one side where the paper's loss is unbounded.
And ``rho_max > 0`` truncates the importance weight, ``sg(min(rho, rho_max))`` (as in
truncated importance sampling): ``rho`` is the exponential of an ELBO difference, which on an
outlier sample (a large ``||v - u||^2``) one update can move by hundreds.

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


def velocity_gap(v: Tensor, v_ref: Tensor, draws: int) -> Tensor:
    """``mean_k ||v_k - v_ref_k||^2``: ``(K * B, *S) -> (B,)`` (gradient through ``v`` only)."""
    return -elbo_surrogate(v, v_ref.detach(), draws)


@dataclass
class EPGLoss:
    """Per-sample EPG loss and parts, each ``(B,)``: ``loss``, ``policy`` (``-sg(rho) A l``),
    ``kl`` (``l_theta - l_ref``), ``rho``, ``v_gap`` (``mean_k ||v_theta - v_ref||^2``, zeros
    when not computed), ``clipped`` (bool: the negative margin stopped this sample's gradient),
    ``weight`` (the importance weight used: ``rho``, truncated at ``rho_max``)."""

    loss: Tensor
    policy: Tensor
    kl: Tensor
    rho: Tensor
    v_gap: Tensor
    clipped: Tensor
    weight: Tensor


def epg_loss(
    l_theta: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    *,
    l_ref: Tensor | None = None,
    beta: float = 0.0,
    v_gap: Tensor | None = None,
    kl_velocity: float = 0.0,
    negative_margin: float = 0.0,
    rho_max: float = 0.0,
) -> EPGLoss:
    """``-sg(rho) A l_theta + beta (l_theta - l_ref) + kl_velocity v_gap`` with
    ``rho = exp(l_theta - l_old)``.

    Args:
        l_theta: ``(B,)`` theta's ELBO surrogate (with gradient).
        l_old, l_ref: ``(B,)`` the old policy's / reference's at the same draws (constants).
        advantages: ``(B,)`` ``R - mean_group(R)``.
        v_gap: ``(B,)`` :func:`velocity_gap` of theta to the reference (with gradient); needed
            when ``kl_velocity > 0``.
        negative_margin: ``m > 0``: no gradient from the policy term of a sample with
            ``A < 0`` and ``l_theta < l_ref - m`` (needs ``l_ref``).
        rho_max: ``> 0``: the weight is ``min(rho, rho_max)`` (``EPGLoss.rho`` stays untruncated).
    """
    if kl_velocity > 0 and v_gap is None:
        raise ValueError("epg_loss: kl_velocity > 0 needs v_gap")
    if negative_margin > 0 and l_ref is None:
        raise ValueError("epg_loss: negative_margin > 0 needs l_ref")
    rho = torch.exp(l_theta.detach() - l_old.detach())
    adv = advantages.to(l_theta.dtype)
    clipped = torch.zeros_like(l_theta, dtype=torch.bool)
    if negative_margin > 0:
        clipped = (adv < 0) & (l_theta.detach() < l_ref.detach() - negative_margin)
    weight = rho.clamp(max=rho_max) if rho_max > 0 else rho
    policy = -weight * adv * torch.where(clipped, l_theta.detach(), l_theta)
    kl = l_theta - l_ref.detach() if l_ref is not None else torch.zeros_like(l_theta)
    gap = v_gap if v_gap is not None else torch.zeros_like(l_theta)
    return EPGLoss(policy + beta * kl + kl_velocity * gap, policy, kl, rho, gap, clipped, weight)


class EPG(AlgorithmBase):
    """ELBO policy gradient (see the module docstring).

    Metrics: ``loss/policy``, ``loss/ref_elbo_gap`` (``l_theta - l_ref``), ``stats/rho_mean``,
    ``stats/elbo`` (``l_theta``), ``loss/ref_velocity_gap`` (with ``kl_velocity > 0``),
    ``stats/negative_clipped`` (fraction of samples, with ``negative_margin > 0``),
    ``stats/rho_truncated`` (fraction, with ``rho_max > 0``; ``stats/rho_mean`` is then the
    truncated weight's mean).
    """

    conventions = {
        "advantage.std": ("none", "EPG's advantage is R - mean_group(R), not divided by a std"),
        "sampler.guidance_scale": (1.0, "EPG samples with ODE rollouts and no CFG"),
    }

    @dataclass
    class Config(TrainingTimes):
        """Hyper-parameters (no official code; defaults are ours, documented).

        Attributes:
            beta: weight of the ELBO-difference KL ``l_theta - l_ref`` (the paper's form).
            kl_velocity: weight of ``mean_k ||v_theta - v_ref||^2`` (ours; 0 = the paper's
                loss).  The reference pass runs only when ``beta`` or this is > 0.
            negative_margin: ``m`` (ours; 0 = the paper's loss): a negative sample's ELBO is
                lowered at most to ``m`` below the reference's.
            rho_max: truncation of the importance weight (ours; 0 = none, the paper's).
            num_draws: ``K`` shared ``(t, eps)`` draws per sample.
            time_sampling: ``uniform`` / ``logit_normal`` over ``[t_min, t_max]``.
        """

        beta: float = 0.0
        kl_velocity: float = 0.0
        negative_margin: float = 0.0
        rho_max: float = 0.0
        num_draws: int = 4

        def validate(self) -> None:
            super().validate()
            require_at_least(self, {"num_draws": 1, "beta": 0, "kl_velocity": 0, "negative_margin": 0, "rho_max": 0})

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
        l_ref = v_ref = None
        if cfg.beta > 0 or cfg.kl_velocity > 0 or cfg.negative_margin > 0:
            with torch.no_grad(), policy.reference():
                v_ref = policy.velocity(x_t, t, cond)
            l_ref = elbo_surrogate(v_ref, u, k)
        l_old = None
        if not self.old.fresh:
            with self.old.active(policy):
                l_old = elbo_surrogate(policy.velocity(x_t, t, cond), u, k)
        v_theta = policy.velocity(x_t, t, cond)
        l_theta = elbo_surrogate(v_theta, u, k)
        if l_old is None:  # old == theta: rho = 1 without a second pass
            l_old = l_theta.detach()
        v_gap = velocity_gap(v_theta, v_ref, k) if cfg.kl_velocity > 0 else None
        out = epg_loss(l_theta, l_old, batch.advantages, l_ref=l_ref, beta=cfg.beta, v_gap=v_gap,
                       kl_velocity=cfg.kl_velocity, negative_margin=cfg.negative_margin, rho_max=cfg.rho_max)
        metrics = {
            "loss/policy": float(out.policy.detach().mean()),
            "loss/ref_elbo_gap": float(out.kl.detach().mean()),
            "stats/rho_mean": float(out.weight.mean()),  # the weight used (truncated with rho_max)
            "stats/elbo": float(l_theta.detach().mean()),
        }
        if v_gap is not None:
            metrics["loss/ref_velocity_gap"] = float(v_gap.detach().mean())
        if cfg.rho_max > 0:
            metrics["stats/rho_truncated"] = float((out.rho > cfg.rho_max).float().mean())
        if cfg.negative_margin > 0:
            metrics["stats/negative_clipped"] = float(out.clipped.float().mean())
        yield LossOutput(out.loss.mean(), metrics)

    def after_step(self, policy: Any, step: int) -> None:
        self.old.after_step(policy, step)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
