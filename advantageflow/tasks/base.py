"""The task protocol: where prompts come from and what "better" means beyond the reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor


@dataclass
class Prompt:
    """One prompt and its structured metadata (handed to the reward per sample)."""

    text: str
    metadata: dict = field(default_factory=dict)


class Task(Protocol):
    """A prompt set with fixed train and test splits.

    Implementations subclass :class:`TaskBase`, have a nested ``Config`` dataclass (with a
    ``name`` field) and are built as ``Task(cfg)``.
    """

    Config: type

    def train_prompts(self) -> list[Prompt]: ...

    def test_prompts(self) -> list[Prompt]: ...

    def evaluate(self, images: Tensor, prompts: list[Prompt]) -> dict[str, Any]:
        """Task-specific metrics on decoded samples ``(B, ...)`` (e.g. ShapesEval's per-tag
        accuracy), logged under ``eval/``; non-scalar values go to the evaluation's details."""

    def guards(self, policy: Any, result: Any = None) -> dict[str, float]:
        """Checks of a trained policy beyond the reward (``advantageflow eval`` prints them),
        given the evaluation's result."""


class TaskBase:
    """The defaults of :class:`Task`'s optional members: no metrics of its own, no guards."""

    def evaluate(self, images: Tensor, prompts: list[Prompt]) -> dict[str, Any]:
        return {}

    def guards(self, policy: Any, result: Any = None) -> dict[str, float]:
        return {}
