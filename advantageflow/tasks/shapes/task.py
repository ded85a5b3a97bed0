"""The ShapesEval task: fixed train / test prompt splits and GenEval-style evaluation.

See :mod:`advantageflow.tasks.shapes.grammar` for the prompts and splits and
:mod:`advantageflow.tasks.shapes.evaluator` for the scoring.  Each :class:`Prompt` carries its
scene spec (``SceneSpec.to_dict()``, JSON-able) as metadata; ``shapes_eval`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from advantageflow.tasks.base import Prompt, TaskBase
from advantageflow.tasks.shapes.evaluator import flow_matching_loss, prompt_groups, sample_diversity, score, summarize
from advantageflow.tasks.shapes.grammar import eval_slots, splits, to_prompt
from advantageflow.tasks.shapes.reward import spec_of
from advantageflow.tasks.shapes.scene import TAGS, SceneSpec


def _prompts(specs: tuple[SceneSpec, ...], tags: list[str]) -> list[Prompt]:
    return [Prompt(to_prompt(s), s.to_dict()) for s in specs if s.tag in tags]


class ShapesTask(TaskBase):
    """ShapesEval: 296 train prompts and 88 held-out test prompts over six GenEval tags,
    evaluated as 96 slots (16 per tag; the 8 single-object prompts twice each)."""

    @dataclass
    class Config:
        """Attributes: tags: restrict both splits to these tags (empty = all six)."""

        name: str = "shapes"
        tags: list[str] = field(default_factory=lambda: list(TAGS))

        def validate(self) -> None:
            from advantageflow.configbase import ConfigError

            unknown = [t for t in self.tags if t not in TAGS]
            if unknown:
                raise ConfigError(f"unknown shapes tags {unknown} (known: {', '.join(TAGS)})")
            if not self.tags:
                raise ConfigError("task.tags must name at least one tag")

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg or ShapesTask.Config()
        self.cfg.validate()
        self._train = splits()[0]
        self._test = eval_slots()

    def train_prompts(self) -> list[Prompt]:
        return _prompts(self._train, self.cfg.tags)

    def test_prompts(self) -> list[Prompt]:
        """The evaluation slots (:func:`~.grammar.eval_slots`): 16 per tag, so with
        ``eval.num_prompts: 96`` every tag gets the same number of images."""
        return _prompts(self._test, self.cfg.tags)

    def evaluate(self, images: Tensor, prompts: list[Prompt]) -> dict[str, Any]:
        """Strict / partial accuracy overall (mean over tags) and per tag (``strict/<tag>``),
        ``strict/images``, and ``diversity`` (within-prompt; prompts grouped by text).

        ``images`` ``(B, 3, H, W)`` in ``[0, 1]``; ``prompts`` ``B`` :class:`Prompt`.
        """
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        specs = [spec_of(p.text, p.metadata) for p in prompts]
        result: dict[str, Any] = summarize(score(images, specs))
        groups = prompt_groups([p.text for p in prompts])
        if len(set(groups)) < len(prompts):
            result["diversity"] = sample_diversity(images, groups)
        return result

    # guards for `advantageflow eval --task shapes` (see the evaluator module)
    sample_diversity = staticmethod(sample_diversity)
    flow_matching_loss = staticmethod(flow_matching_loss)

    def guards(self, policy: Any, result: Any = None) -> dict[str, float]:
        """Signs of reward hacking: within-prompt diversity (in the eval metrics) and the
        flow-matching loss on real renders of the test split, tuned vs base (the policy's
        reference).  A tuned model far above its base has forgotten what scenes look like."""
        tuned = flow_matching_loss(policy)
        with policy.reference():
            base = flow_matching_loss(policy)
        return {"guard/fm_loss_real": tuned, "guard/fm_loss_real_base": base,
                "guard/fm_loss_ratio": tuned / base}
