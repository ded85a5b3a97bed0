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

    Implementations have a nested ``Config`` dataclass (with a ``name`` field) and are built
    as ``Task(cfg)``.  ``evaluate`` is optional: task-specific metrics on decoded samples
    (e.g. ShapesEval's per-tag accuracy), logged under ``eval/``.
    """

    Config: type

    def train_prompts(self) -> list[Prompt]: ...

    def test_prompts(self) -> list[Prompt]: ...

    def evaluate(self, images: Tensor, prompts: list[Prompt]) -> dict[str, Any]: ...
