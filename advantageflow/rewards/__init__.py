"""Rewards: the protocol, the registry, composition and the built-in scorers."""

from advantageflow.rewards.base import (
    REWARDS,
    CompositeReward,
    RewardError,
    RewardFn,
    RewardResult,
    build_reward,
    is_differentiable,
)

# Built-ins, imported lazily by name.
REWARDS.register("toy2d_modes", "advantageflow.tasks.toy2d:ModeReward")
REWARDS.register("toy2d_smooth", "advantageflow.tasks.toy2d:SmoothModeReward")
REWARDS.register("shapes_eval", "advantageflow.tasks.shapes.reward:ShapesEvalReward")

__all__ = [
    "REWARDS",
    "CompositeReward",
    "RewardError",
    "RewardFn",
    "RewardResult",
    "build_reward",
    "is_differentiable",
]
