"""Rewards used by the trainer tests (resolved by dotted path, as a user's would be)."""

from __future__ import annotations

import torch

from advantageflow.tasks.toy2d import ModeReward


class CrashingModeReward(ModeReward):
    """The toy mode reward that raises on its ``crash_at``-th call (simulates a dying run)."""

    def __init__(self, modes: list[int] = (0, 1, 2), crash_at: int = 0) -> None:
        super().__init__(modes)
        self.crash_at = crash_at
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.crash_at and self.calls >= self.crash_at:
            raise RuntimeError("simulated crash")
        return super().__call__(images, prompts, metadata)


class NaNReward(ModeReward):
    """Returns NaN for every sample from its ``bad_from``-th call on."""

    def __init__(self, bad_from: int = 1) -> None:
        super().__init__()
        self.bad_from = bad_from
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        out = super().__call__(images, prompts, metadata)
        return torch.full_like(out, float("nan")) if self.calls >= self.bad_from else out


class RankFaultReward(ModeReward):
    """Raises (``mode="raise"``) or hangs (``mode="hang"``) on process ``rank`` at call ``at``."""

    def __init__(self, rank: int = 1, at: int = 2, mode: str = "raise") -> None:
        super().__init__()
        self.rank, self.at, self.mode = rank, at, mode
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        import os
        import time

        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.rank and self.calls >= self.at:
            if self.mode == "hang":
                time.sleep(3600)
            raise RuntimeError(f"simulated failure on rank {self.rank}")
        return super().__call__(images, prompts, metadata)


class WrongShapeReward:
    """Returns 5 scores whatever the batch."""

    def __call__(self, images, prompts, metadata):
        return torch.zeros(5)
