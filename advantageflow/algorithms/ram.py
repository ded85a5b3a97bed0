"""Reinforce Adjoint Matching, RAM (Bergmeister et al., arXiv 2605.10759).

KL-regularised fine-tuning from final samples of the current model (any ODE sampler)::

    L = || v_theta(x_t, t) - sg[ v_ref(x_t, t) + eta * A(x0) * (u - v_theta(x_t, t)) ] ||^2

with ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0`` and ``eta`` the "reward multiplier".  Its
semigradient is that of ``||v_theta - v_ref||^2 + eta * A * ||v_theta - u||^2`` (tested): a
pull to the reference plus the advantage-weighted flow-matching term the other forward-process
methods share.  Needs final samples only.

Per sample that objective is quadratic in ``v`` with curvature ``1 + eta A``: it has a
minimiser only while ``eta A > -1``.  The paper's ``eta = 50`` goes with its advantage scale;
with unit-std advantages (this library's default) pick ``eta < 1 / max|A|`` (the 2-D config
uses 0.5) or the samples with negative advantage push ``v`` away from ``u`` without bound.
``stats/nonconvex_frac`` logs the fraction of samples with ``eta A <= -1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import TrainingTimes, noised, require_at_least
from advantageflow.sampling import SamplerRequest
from advantageflow.types import LossOutput, Rollout, expand_time, mean_flat


@dataclass
class RAMLoss:
    """Per-sample RAM loss and the two parts of its semigradient, each ``(B,)``:
    ``loss``, ``reg_ref`` (``||v - v_ref||^2``), ``fm`` (``||v - u||^2``)."""

    loss: Tensor
    reg_ref: Tensor
    fm: Tensor


def ram_loss(v_theta: Tensor, v_ref: Tensor, u: Tensor, advantages: Tensor, eta: float) -> RAMLoss:
    """RAM's per-sample regression loss (module docstring).

    Args:
        v_theta: ``(B, *S)`` theta's velocity (with gradient).
        v_ref: ``(B, *S)`` the reference's velocity (constant).
        u: ``(B, *S)`` target ``eps - x0``.
        advantages: ``(B,)``.
        eta: reward multiplier.
    """
    a = expand_time(advantages, v_theta)
    target = (v_ref + eta * a * (u - v_theta)).detach()
    loss = mean_flat((v_theta - target) ** 2)
    with torch.no_grad():
        reg_ref = mean_flat((v_theta - v_ref) ** 2)
        fm = mean_flat((v_theta - u) ** 2)
    return RAMLoss(loss, reg_ref, fm)


class RAM(AlgorithmBase):
    """Reinforce Adjoint Matching (see the module docstring).

    Metrics: ``loss/policy`` (the regression loss), ``loss/ref_velocity_mse`` (``||v - v_ref||^2``),
    ``stats/velocity_mse``, ``stats/nonconvex_frac`` (samples with ``eta A <= -1``).
    """

    @dataclass
    class Config(TrainingTimes):
        """Hyper-parameters.

        Attributes:
            eta: reward multiplier (50 in the paper, for its advantage scale; keep
                ``eta * A > -1``, see the module docstring).
            draws_per_sample: independent ``(t, eps)`` draws per sample and update.
            time_sampling, t_min, t_max: training times.
        """

        eta: float = 50.0
        draws_per_sample: int = 1

        def validate(self) -> None:
            super().validate()
            require_at_least(self, {"eta": 0, "draws_per_sample": 1})

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest()

    def begin_epoch(self, policy: Any) -> None:
        pass

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy, x0 = self.cfg, ctx.policy, batch.x0
        rows = ctx.row_random(len(batch))
        for _ in range(cfg.draws_per_sample):
            t = cfg.draw_times(rows, x0.device).to(x0.dtype)
            eps = rows.randn(*x0.shape[1:]).to(x0)
            x_t = noised(x0, t, eps)
            with torch.no_grad(), policy.reference():
                v_ref = policy.velocity(x_t, t, batch.cond)
            v_theta = policy.velocity(x_t, t, batch.cond)
            adv = batch.advantages.to(x0.dtype)
            out = ram_loss(v_theta, v_ref, eps - x0, adv, cfg.eta)
            yield LossOutput(
                out.loss.mean() / cfg.draws_per_sample,
                {
                    "loss/policy": float(out.loss.detach().mean()),
                    "loss/ref_velocity_mse": float(out.reg_ref.detach().mean()),
                    "stats/velocity_mse": float(out.fm.detach().mean()),
                    "stats/nonconvex_frac": float((cfg.eta * adv <= -1.0).float().mean()),
                },
            )

    def after_step(self, policy: Any, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
