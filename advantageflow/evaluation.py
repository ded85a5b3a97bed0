"""Held-out evaluation: the same prompts and noise every time, so numbers are comparable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from advantageflow.algorithms.base import SamplerRequest
from advantageflow.build import time_grid_for
from advantageflow.config import Config
from advantageflow.rollouts import decode_and_score, generate
from advantageflow.tasks.base import Prompt


@dataclass
class EvalResult:
    """Attributes:
    metrics: ``eval/...`` scalars (reward mean, the task's own metrics).
    images: ``(B, ...)`` decoded samples.  prompts: their prompts.
    details: non-scalar extras from the task (e.g. per-sample scores).
    """

    metrics: dict[str, float]
    images: Tensor
    prompts: list[Prompt]
    details: dict[str, Any] = field(default_factory=dict)


def eval_prompts(task: Any, num_prompts: int, samples_per_prompt: int) -> list[Prompt]:
    """``num_prompts`` evenly spaced test prompts (cycled if fewer), each repeated per sample.

    Evenly spaced rather than the first ones, so a split ordered by category is covered.
    """
    test = task.test_prompts()
    if not test:
        raise ValueError("the task has no test prompts")
    if num_prompts <= len(test):
        chosen = [test[(i * len(test)) // num_prompts] for i in range(num_prompts)]
    else:
        chosen = [test[i % len(test)] for i in range(num_prompts)]
    return [p for p in chosen for _ in range(samples_per_prompt)]


@torch.no_grad()
def evaluate_policy(policy: Any, task: Any, reward: Any, cfg: Config) -> EvalResult:
    """Sample the evaluation prompts with the evaluation sampler and score them."""
    prompts = eval_prompts(task, cfg.eval.num_prompts, cfg.eval.samples_per_prompt)
    grid = time_grid_for(policy, cfg.sampler.eval_steps, cfg.sampler.shift)
    keys = [(cfg.seed, "eval", i) for i in range(len(prompts))]
    groups = [i // cfg.eval.samples_per_prompt for i in range(len(prompts))]
    rollout = generate(
        policy, prompts, keys, groups, grid, SamplerRequest(), cfg.sampler.eval_solver,
        cfg.sampler.guidance_scale, cfg.sampler.batch_size,
    )
    result, images = decode_and_score(policy, reward, rollout, cfg.sampler.batch_size)
    metrics = {"eval/reward_mean": float(result.total.float().mean())}
    for name, value in result.components.items():
        metrics[f"eval/reward/{name}"] = float(value.float().mean())
    details: dict[str, Any] = {}
    task_eval = getattr(task, "evaluate", None)
    if callable(task_eval):
        for key, value in task_eval(images, prompts).items():
            if isinstance(value, (int, float)):
                metrics[f"eval/{key}"] = float(value)
            else:
                details[key] = value
    return EvalResult(metrics=metrics, images=images.cpu(), prompts=prompts, details=details)
