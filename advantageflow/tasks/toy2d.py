"""The 2-D task: an 8-mode Gaussian mixture and rewards that prefer some of its modes.

Runs in seconds on a CPU.  RL should move mass to the rewarded modes while the anchors
keep each mode's shape (its spread), which :meth:`Toy2DTask.evaluate` measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from advantageflow.tasks.base import Prompt, TaskBase
from advantageflow.toydata import MODE_STD, NUM_MODES, mode_centres


def nearest_mode(x: Tensor) -> tuple[Tensor, Tensor]:
    """Index ``(B,)`` of each point's nearest centre and the distance to it ``(B,)``."""
    dist = torch.cdist(x.float(), mode_centres().to(x.device))
    d, idx = dist.min(dim=1)
    return idx, d


class ModeReward:
    """1 for points whose nearest mode is rewarded and within 3 mode-stds of it, else 0."""

    differentiable = False
    builds_cheaply = True
    arg_ranges = {"modes": ((">=", 0), ("<=", 7))}  # checked by `validate` (an empty list rewards nothing)

    def __init__(self, modes: list[int] = (0, 1, 2)) -> None:
        self.modes = torch.tensor(list(modes))

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        idx, d = nearest_mode(images)
        hit = torch.isin(idx, self.modes.to(idx.device)) & (d < 3 * MODE_STD)
        return hit.float()


class SmoothModeReward:
    """Differentiable: ``sum_k exp(-||x - mu_k||^2 / (2 w^2))`` over the rewarded modes."""

    differentiable = True
    builds_cheaply = True
    arg_ranges = {"modes": ((">=", 0), ("<=", 7)), "width": ((">", 0),)}  # width 0: every reward 0

    def __init__(self, modes: list[int] = (0, 1, 2), width: float = 0.5) -> None:
        self.modes = list(modes)
        self.width = width

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        centres = mode_centres().to(images.device, images.dtype)[self.modes]
        sq = ((images[:, None, :] - centres[None]) ** 2).sum(-1)
        return torch.exp(-sq / (2 * self.width**2)).sum(dim=1)


class Toy2DTask(TaskBase):
    """Unconditional: every prompt is the empty string."""

    @dataclass
    class Config:
        """Attributes: rewarded_modes: the modes the evaluation counts as rewarded."""

        name: str = "toy2d"
        rewarded_modes: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def train_prompts(self) -> list[Prompt]:
        return [Prompt("")]

    def test_prompts(self) -> list[Prompt]:
        return [Prompt("")]

    def evaluate(self, images: Tensor, prompts: list[Prompt]) -> dict[str, float]:
        """Mass on rewarded modes, mass off every mode, and the spread of each kept mode.

        ``mode_std_ratio``: mean within-mode std of the points (per axis, averaged over modes
        with at least 5 points) divided by the data's ``MODE_STD``; 1 means shape kept.
        """
        idx, d = nearest_mode(images)
        on = d < 3 * MODE_STD
        rewarded = torch.isin(idx, torch.tensor(self.cfg.rewarded_modes))
        stds = []
        for k in range(NUM_MODES):
            pts = images[(idx == k) & on]
            if len(pts) >= 5:
                stds.append(float((pts - pts.mean(0)).std(0).mean()))
        return {
            "rewarded_fraction": float((rewarded & on).float().mean()),
            "off_mode_fraction": float((~on).float().mean()),
            "modes_covered": float(len(stds)),
            "mode_std_ratio": (sum(stds) / len(stds) / MODE_STD) if stds else float("nan"),
        }
