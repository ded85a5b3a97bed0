"""The ``shapes_eval`` reward: ShapesEval's clause checker as a batched reward.

``reward(images, prompts, metadata) -> {"score": (B,) partial credit, "strict": (B,) 0/1}``.
The spec of each sample comes from its metadata (``SceneSpec.to_dict()`` as the task hands
it out, directly or under a ``"spec"`` key) and otherwise from parsing the prompt text.
Not differentiable (connected components and thresholds).
"""

from __future__ import annotations

import torch
from torch import Tensor

from advantageflow.tasks.shapes.evaluator import score
from advantageflow.tasks.shapes.grammar import parse_prompt
from advantageflow.tasks.shapes.scene import SceneSpec


def spec_of(prompt: str, metadata: dict | None) -> SceneSpec:
    """The scene spec of one sample: from ``metadata`` when it carries one, else the prompt."""
    if metadata:
        data = metadata.get("spec", metadata)
        if isinstance(data, dict) and "objects" in data and "tag" in data:
            return SceneSpec.from_dict(data)
    return parse_prompt(prompt)


class ShapesEvalReward:
    """GenEval-style partial credit (``score``, the reward) and strict correctness (``strict``).

    Args:
        strict_weight: the reward is ``(1 - w) * partial + w * strict``; 0 (default) is pure
            partial credit as in the module docstring.
        exact_counts: every count clause asks for exactly the prompt's number of objects of its
            shape (:func:`~advantageflow.tasks.shapes.evaluator.check`), so drawing extra copies
            costs reward.  On by default since 2026-12-05: under GenEval's "at least" rule a
            policy gains by over-drawing (``docs/shapes.md``, "The guard, measured").  ``false``
            trains on the benchmark's own headline rule ("at least" outside the counting tag).
            The evaluation reports both (``strict``, ``strict_exact``) whichever the reward uses.
    """

    differentiable = False
    builds_cheaply = True

    def __init__(self, strict_weight: float = 0.0, exact_counts: bool = True) -> None:
        if not 0.0 <= strict_weight <= 1.0:
            raise ValueError(f"strict_weight must be in [0, 1], got {strict_weight}")
        if not isinstance(exact_counts, bool):
            raise ValueError(f"exact_counts must be true or false, got {exact_counts!r}")
        self.strict_weight = strict_weight
        self.exact_counts = exact_counts

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"shapes_eval expects images (B, 3, H, W), got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"shapes_eval got {images.shape[0]} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata else [{}] * len(prompts)
        specs = [spec_of(p, m) for p, m in zip(prompts, metadata)]
        verdicts = score(images, specs, self.exact_counts)
        partial = torch.tensor([v.partial for v in verdicts], dtype=torch.float32)
        strict = torch.tensor([v.strict for v in verdicts], dtype=torch.float32)
        w = self.strict_weight
        reward = (1 - w) * partial + w * strict
        return {"score": reward.to(images.device), "strict": strict.to(images.device)}
