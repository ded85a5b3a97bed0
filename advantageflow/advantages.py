"""Group-relative advantages (docs/algorithms/README.md, "Advantages").

``A_i = (R_i - mean_group(R)) / (std + eps)``, with ``std`` the standard deviation of all
rewards of the epoch (``global``, the Flow-GRPO / AWM / DiffusionNFT default), of the sample's
group (``group``), or 1 (``none``, the ELBO policy gradient).  Then clipped to
``[-clip, clip]``.  Groups whose rewards are all equal get zero advantage and are counted
(``zero_std_ratio``).  Call these on the *complete* epoch: every process's rewards gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["global", "group", "none"]


@dataclass
class Advantages:
    """Attributes:
    values: ``(B,)`` clipped advantages.
    zero_std: ``(B,)`` bool, the sample's group has (numerically) equal rewards.
    zero_std_ratio: fraction of groups with equal rewards.
    """

    values: Tensor
    zero_std: Tensor
    zero_std_ratio: float


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std: StdMode = "global",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """Advantages of ``rewards`` ``(B,)`` within groups ``group_ids`` ``(B,)`` (float64 maths)."""
    r = rewards.double()
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    sq = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, centred**2)
    # Population std within a group (torch.std(unbiased=False)), as the authors' code.
    group_std = torch.sqrt(sq / count)
    zero_group = group_std < 1e-8
    if std == "global":
        scale = r.std(unbiased=False) + eps
    elif std == "group":
        scale = group_std[inverse] + eps
    elif std == "none":
        scale = torch.ones_like(r)
    else:
        raise ValueError(f"unknown advantage std mode '{std}' (global, group, none)")
    values = (centred / scale).clamp(-clip, clip)
    zero = zero_group[inverse]
    values = torch.where(zero, torch.zeros_like(values), values)
    return Advantages(
        values=values.to(rewards.dtype if rewards.is_floating_point() else torch.float32),
        zero_std=zero,
        zero_std_ratio=float(zero_group.double().mean()),
    )


def combined_advantages(
    components: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    std: StdMode = "global",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """Per-reward normalisation, then the weighted sum (``reward.combine: per_reward``), both
    clipped to ``[-clip, clip]``: an algorithm always sees advantages within the run's clip
    (weights summing above 1 could leave it; the clip-owning algorithms used to clip the sum).

    A group counts as zero-std only when every component is constant within it.
    """
    parts = {n: group_advantages(components[n], group_ids, std, clip, eps) for n in weights}
    values = sum(weights[n] * parts[n].values for n in weights).clamp(-clip, clip)
    zero = torch.stack([p.zero_std for p in parts.values()]).all(dim=0)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    zero_groups = torch.zeros(n_groups, dtype=torch.bool).index_put_((inverse,), zero)
    return Advantages(values=values, zero_std=zero, zero_std_ratio=float(zero_groups.double().mean()))
