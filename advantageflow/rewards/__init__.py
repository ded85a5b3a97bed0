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
REWARDS.register("ocr", "advantageflow.rewards.ocr:OcrReward")
REWARDS.register("jpeg_compressibility", "advantageflow.rewards.jpeg:JpegCompressibility")
REWARDS.register("jpeg_incompressibility", "advantageflow.rewards.jpeg:JpegIncompressibility")
REWARDS.register("clip_score", "advantageflow.rewards.clip_scorers:ClipScore")
REWARDS.register("pickscore", "advantageflow.rewards.clip_scorers:PickScore")
REWARDS.register("aesthetic", "advantageflow.rewards.clip_scorers:AestheticScore")
REWARDS.register("hpsv2", "advantageflow.rewards.clip_scorers:HPSv2Score")
REWARDS.register("imagereward", "advantageflow.rewards.clip_scorers:ImageRewardScore")
REWARDS.register("remote", "advantageflow.rewards.remote:RemoteReward")
REWARDS.register("vlm_judge", "advantageflow.rewards.vlm_judge:VlmJudgeReward")

__all__ = [
    "REWARDS",
    "CompositeReward",
    "RewardError",
    "RewardFn",
    "RewardResult",
    "build_reward",
    "is_differentiable",
]
