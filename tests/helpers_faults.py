"""Hostile rewards for the fault tests (resolved by dotted path, as a user's would be)."""

from __future__ import annotations

from advantageflow.tasks.toy2d import ModeReward


class NoneReward:
    def __call__(self, images, prompts, metadata):
        return None


class StringReward:
    def __call__(self, images, prompts, metadata):
        return ["good"] * images.shape[0]


class RaisingReward:
    def __call__(self, images, prompts, metadata):
        raise ValueError("the scorer fell over\nwith a second line")


class NaNAfterReward(ModeReward):
    """The toy mode reward, then NaN for one sample from its ``bad_from``-th call on."""

    def __init__(self, bad_from: int = 2) -> None:
        super().__init__()
        self.bad_from, self.calls = bad_from, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        out = super().__call__(images, prompts, metadata)
        if self.calls >= self.bad_from:
            out[0] = float("nan")
        return out
