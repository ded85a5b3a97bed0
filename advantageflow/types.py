"""Core data types and the one time convention of the project.

Time convention (rectified flow, the diffusers / SD3 convention)
---------------------------------------------------------------
``t = 0`` is data and ``t = 1`` is noise::

    x_t = (1 - t) * x0 + t * eps,        eps ~ N(0, I)
    u   = eps - x0                        (the velocity target)
    f   = x_t - t * v                     (the clean-sample / "x0" prediction)

Sampling integrates from ``t = 1`` down to ``t = 0`` on a decreasing grid
``1 = s_0 > s_1 > ... > s_N = 0``.  Shapes below use ``B`` for the batch and ``S`` for
the per-sample shape of the model's state (``(2,)`` for the 2-D task, ``(C, H, W)`` for
images or latents), ``N`` for the number of sampler steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


def index_cond(cond: Any, idx: Tensor) -> Any:
    """Select rows ``idx`` of a conditioning object.

    Conditioning is policy-specific: ``None``, a tensor ``(B, ...)``, or a dict / list /
    tuple of those (nested).  Every tensor's first dimension is the batch.
    """
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_cond(v, idx) for v in cond)
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")


def cat_cond(conds: list[Any]) -> Any:
    """Concatenate conditioning objects along the batch (inverse of :func:`index_cond`)."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(conds, dim=0)
    if isinstance(first, dict):
        return {k: cat_cond([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_cond(list(parts)) for parts in zip(*conds))
    raise TypeError(f"cannot concatenate conditioning of type {type(first).__name__}")


@dataclass
class Rollout:
    """A batch of samples from the rollout policy, with what the algorithms need.

    Attributes:
        x0: ``(B, *S)`` final clean samples (the end of the sampler, ``t = 0``).
        noise: ``(B, *S)`` initial noise the sampler started from (``t = 1``).
        cond: conditioning for the policy, batch-first (see :func:`index_cond`).
        prompts: ``B`` prompt strings (empty strings for unconditional tasks).
        group_ids: ``(B,)`` long; samples with the same id share a prompt (a *group*).
        grid: ``(N + 1,)`` the decreasing time grid the sampler used, ``grid[0] = 1``.
        metadata: ``B`` per-sample dicts handed to the reward (e.g. the prompt's spec).
        trajectory: ``(B, N + 1, *S)`` states at every grid point, or ``None`` unless an
            algorithm asked for it (Flow-GRPO, DRaFT).  ``trajectory[:, 0] = noise``,
            ``trajectory[:, -1] = x0``.
        log_probs: ``(B, N)`` per-step log-probabilities of the stochastic sampler, or
            ``None``; ``nan`` where a step was deterministic.
        rewards: ``(B,)`` float rewards, once scored.
        reward_components: named ``(B,)`` components of the reward, once scored.
        advantages: ``(B,)`` float advantages, once computed.
    """

    x0: Tensor
    noise: Tensor
    cond: Any
    prompts: list[str]
    group_ids: Tensor
    grid: Tensor
    metadata: list[dict] = field(default_factory=list)
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    rewards: Tensor | None = None
    reward_components: dict[str, Tensor] = field(default_factory=dict)
    advantages: Tensor | None = None

    def __len__(self) -> int:
        return self.x0.shape[0]

    def select(self, idx: Tensor | list[int]) -> Rollout:
        """Rows ``idx`` of every batch-first field (the grid is shared)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "grid" or value is None:
                out[f.name] = value
            elif f.name == "cond":
                out[f.name] = index_cond(value, idx)
            elif f.name in ("prompts", "metadata"):
                out[f.name] = [value[i] for i in idx.tolist()] if value else value
            elif f.name == "reward_components":
                out[f.name] = {k: v[idx.to(v.device)] for k, v in value.items()}
            else:
                out[f.name] = value[idx.to(value.device)]
        return Rollout(**out)

    def with_(self, **changes: Any) -> Rollout:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Concatenate rollouts along the batch; they must share a grid."""
        first = parts[0]

        def cat_opt(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=0)

        components = {
            k: torch.cat([p.reward_components[k] for p in parts]) for k in first.reward_components
        }
        return Rollout(
            x0=torch.cat([p.x0 for p in parts]),
            noise=torch.cat([p.noise for p in parts]),
            cond=cat_cond([p.cond for p in parts]),
            prompts=[s for p in parts for s in p.prompts],
            group_ids=torch.cat([p.group_ids for p in parts]),
            grid=first.grid,
            metadata=[m for p in parts for m in p.metadata],
            trajectory=cat_opt("trajectory"),
            log_probs=cat_opt("log_probs"),
            rewards=cat_opt("rewards"),
            reward_components=components,
            advantages=cat_opt("advantages"),
        )


@dataclass
class LossOutput:
    """One term of an algorithm's loss.

    Attributes:
        loss: scalar tensor with gradient.  The terms an algorithm yields for one
            micro-batch sum to that micro-batch's loss (mean over its samples).
        metrics: scalar floats to log, averaged over terms and micro-batches.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape ``t`` of shape ``(B,)`` to broadcast against ``like`` of shape ``(B, *S)``."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every non-batch dimension: ``(B, *S) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
