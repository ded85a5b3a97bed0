"""DRaFT: direct reward fine-tuning through the sampler (Clark et al., ICLR 2024).

For differentiable rewards only.  Loss ``-R(decode(x0))`` with the gradient flowing through
part of the sampling chain:

- **DRaFT-K**: the rollout is sampled without gradient; the last ``K`` Euler steps are
  re-run from the stored trajectory with gradient (``K = 1`` works best in the paper).
- **DRaFT-LV**: ``K = 1``; the final ``x0`` is re-noised to the last step's time ``s_{N-1}``
  ``n = 2`` times (fresh noise each), denoised one Euler step with gradient each, and the
  rewards are averaged (lower-variance gradient).

Gradient checkpointing (``torch.utils.checkpoint``) trades compute for memory, which grows
with ``K``.  DRaFT-K needs the kept trajectory (rollouts use Euler so that the re-run steps
reproduce them); DRaFT-LV needs final samples only.  Both need the reward gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from advantageflow.algorithms.base import AlgorithmBase, TrainContext
from advantageflow.algorithms.common import noised
from advantageflow.sampling import SamplerRequest, euler_step
from advantageflow.types import LossOutput, Rollout


def reward_total(result: Any) -> Tensor:
    """``(B,)`` scores from a reward's output: a ``RewardResult`` (``.total``) or a tensor."""
    total = getattr(result, "total", result)
    if not isinstance(total, Tensor):
        raise TypeError(f"draft: the reward returned {type(result).__name__}, expected (B,) scores")
    return total


def draft_loss(rewards: Tensor) -> Tensor:
    """``-mean(R)``: ``(B,) -> ()`` (the DRaFT objective; ``rewards`` carry the gradient)."""
    return -rewards.mean()


def euler_chain(
    policy: Any,
    x: Tensor,
    times: list[float],
    cond: Any,
    *,
    guidance_scale: float = 1.0,
    use_checkpoint: bool = False,
) -> Tensor:
    """Euler steps along ``times`` (decreasing) from ``x`` ``(B, *S)``, with gradient.

    Returns the state ``(B, *S)`` at ``times[-1]``.
    """

    def step(x_: Tensor, s: float, s_next: float) -> Tensor:
        t = torch.full((x_.shape[0],), s, device=x_.device, dtype=x_.dtype)
        return euler_step(x_, policy.velocity(x_, t, cond, guidance_scale=guidance_scale), s, s_next)

    for s, s_next in zip(times[:-1], times[1:]):
        if use_checkpoint:
            x = checkpoint(step, x, s, s_next, use_reentrant=False)
        else:
            x = step(x, s, s_next)
    return x


class DRaFT(AlgorithmBase):
    """DRaFT-K and DRaFT-LV (see the module docstring).

    Metrics: ``loss/policy`` (``-R``), ``stats/reward_grad`` (the mean reward of the
    differentiated samples).
    """

    requires_differentiable_reward = True

    @dataclass
    class Config:
        """Hyper-parameters; defaults are the paper's recommendation.

        Attributes:
            variant: ``k`` (DRaFT-K) or ``lv`` (DRaFT-LV).
            k: number of final sampler steps with gradient (DRaFT-K).
            lv_samples: re-noising draws ``n`` (DRaFT-LV).
            gradient_checkpointing: recompute each step's activations in the backward pass.
        """

        variant: Literal["k", "lv"] = "k"
        k: int = 1
        lv_samples: int = 2
        gradient_checkpointing: bool = False

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            if self.k < 1:
                raise ConfigError("k must be >= 1")
            if self.lv_samples < 1:
                raise ConfigError("lv_samples must be >= 1")

    def __init__(self, cfg: Config, policy: Any) -> None:
        self.cfg = cfg

    def sampler_request(self, epoch: int, generator: torch.Generator) -> SamplerRequest:
        return SamplerRequest(solver="euler", keep_trajectory=self.cfg.variant == "k")

    def begin_epoch(self, policy: Any) -> None:
        pass

    def _score(self, batch: Rollout, ctx: TrainContext, x0: Tensor) -> Tensor:
        images = ctx.policy.decode(x0)
        return reward_total(ctx.reward(images, batch.prompts, batch.metadata)).to(x0.device)

    def losses(self, batch: Rollout, ctx: TrainContext) -> Iterator[LossOutput]:
        cfg, policy = self.cfg, ctx.policy
        if ctx.reward is None or not getattr(ctx.reward, "differentiable", False):
            raise ValueError(
                "draft needs a differentiable reward (one with differentiable = True, e.g. toy2d_smooth); "
                "the configured reward is not"
            )
        grid = [float(s) for s in batch.grid]
        n = len(grid) - 1
        if cfg.variant == "k":
            if batch.trajectory is None:
                raise ValueError("draft (variant k) needs rollouts with a kept trajectory")
            k = min(cfg.k, n)
            x0 = euler_chain(
                policy, batch.trajectory[:, n - k], grid[n - k :], batch.cond,
                guidance_scale=ctx.guidance_scale, use_checkpoint=cfg.gradient_checkpointing,
            )
            rewards = self._score(batch, ctx, x0)
        else:
            s_last = grid[n - 1]
            t = torch.full((len(batch),), s_last, device=batch.x0.device, dtype=batch.x0.dtype)
            scores = []
            rows = ctx.row_random(len(batch))
            for _ in range(cfg.lv_samples):
                eps = rows.randn(*batch.x0.shape[1:]).to(batch.x0)
                x_s = noised(batch.x0, t, eps)
                x0 = euler_chain(
                    policy, x_s, grid[n - 1 :], batch.cond,
                    guidance_scale=ctx.guidance_scale, use_checkpoint=cfg.gradient_checkpointing,
                )
                scores.append(self._score(batch, ctx, x0))
            rewards = torch.stack(scores).mean(dim=0)
        loss = draft_loss(rewards)
        metrics = {"loss/policy": float(loss.detach()), "stats/reward_grad": float(rewards.detach().mean())}
        yield LossOutput(loss, metrics)

    def after_step(self, policy: Any, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
