"""The 2-D data both the toy model (its pretraining) and the toy task (its rewards) use: an
equal-weight mixture of 8 Gaussians on a circle.  Below both, so neither imports the other."""

from __future__ import annotations

import math

import torch
from torch import Tensor

RADIUS = 3.0
MODE_STD = 0.25
NUM_MODES = 8


def mode_centres() -> Tensor:
    """``(8, 2)`` centres on a circle of radius 3, mode ``k`` at angle ``2 pi k / 8``."""
    angles = torch.arange(NUM_MODES, dtype=torch.float32) * (2 * math.pi / NUM_MODES)
    return RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def sample_gmm8(n: int, generator: torch.Generator) -> Tensor:
    """``(n, 2)`` samples of the equal-weight 8-mode mixture."""
    idx = torch.randint(NUM_MODES, (n,), generator=generator)
    return mode_centres()[idx] + MODE_STD * torch.randn(n, 2, generator=generator)


DATASETS = {"gmm8": sample_gmm8}
