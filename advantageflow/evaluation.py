"""Held-out evaluation: the same prompts and noise every time, so numbers are comparable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from advantageflow.config import Config
from advantageflow.distributed import DistEnv, full_tensor, placed_like
from advantageflow.models.base import ema_update_
from advantageflow.numerics import thread_invariant_kernels
from advantageflow.rollouts import SamplingSpec, decode_and_score, generate
from advantageflow.seeding import eval_noise_key
from advantageflow.tasks.base import Prompt
from advantageflow.types import Rollout


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


class WeightsEMA:
    """An exponential moving average of the trainable weights, evaluated instead of theta
    (``eval.ema_decay``; Flow-GRPO and DiffusionNFT evaluate one with decay 0.9, AWM 0.99).

    After ``n`` optimizer steps (counted from 1) the update is ``ema = d ema + (1 - d) theta``
    with the warm-up ``d = min((1 + n) / (10 + n), max_decay)`` of the released codes' EMA
    wrapper, starting from the initial weights: the first update uses ``2 / 11``.
    """

    def __init__(self, policy: Any, max_decay: float) -> None:
        self.max_decay = max_decay
        self.params = policy.snapshot()

    def decay(self, steps_done: int) -> float:
        return min((1.0 + steps_done) / (10.0 + steps_done), self.max_decay)

    def update(self, policy: Any, steps_done: int) -> None:
        ema_update_(self.params, policy.trainable_parameters(), self.decay(steps_done))

    @contextlib.contextmanager
    def active(self, policy: Any) -> Iterator[None]:
        """Within this context the policy's trainable weights are the average's."""
        with torch.no_grad(), policy.use_parameters(self.params):
            yield

    def state_dict(self) -> dict:
        """Whole CPU copies (sharded tensors are gathered: every process must call this)."""
        return {"params": [full_tensor(p.detach()).cpu().clone() for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        self.params = [placed_like(s, p) for s, p in zip(state["params"], self.params)]


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


def eval_stripe(total: int, world: int, rank: int) -> list[int]:
    """Process ``rank``'s evaluation samples: a contiguous block of ``ceil(total / world)``
    indices, the last block padded by repeating index ``total - 1`` so every process samples
    as many (the gathered blocks, cut to ``total``, are the samples in order)."""
    share = -(-total // world)
    return [min(rank * share + j, total - 1) for j in range(share)]


@thread_invariant_kernels()  # the kernels the trainer samples with: `eval`/`sample` repeat a run's numbers
def generate_eval_samples(
    policy: Any, prompts: list[Prompt], indices: list[int], seed: int, spec: SamplingSpec, group_size: int = 1
) -> Rollout:
    """Evaluation samples ``indices`` (``B`` ints) of prompts ``prompts`` (``B``).

    Sample ``i``'s noise is keyed by ``eval_noise_key(seed, i)`` whatever else is sampled with
    it, so :func:`evaluate_policy` and ``advantageflow sample --index i`` give sample ``i`` the
    same image.  Its group id is ``i // group_size`` (the evaluation's prompt slot).
    """
    keys = [eval_noise_key(seed, i) for i in indices]
    return generate(policy, prompts, keys, [i // group_size for i in indices], spec)


@torch.no_grad()
@thread_invariant_kernels()  # as in training (oneDNN off), so `advantageflow eval` repeats a run's numbers
def evaluate_policy(policy: Any, task: Any, reward: Any, cfg: Config, env: DistEnv | None = None) -> EvalResult:
    """Sample the evaluation prompts with the evaluation sampler and score them.

    With several processes (``env``) each samples and scores its stripe, and every process
    returns the whole result; sample ``i``'s noise is keyed by ``i``, so the numbers equal the
    single-process ones.
    """
    env = env or DistEnv()
    prompts = eval_prompts(task, cfg.eval.num_prompts, cfg.eval.samples_per_prompt)
    spec = SamplingSpec.for_evaluation(policy, cfg.sampler)
    mine = eval_stripe(len(prompts), env.world_size, env.rank)
    rollout = generate_eval_samples(
        policy, [prompts[i] for i in mine], mine, cfg.seed, spec, cfg.eval.samples_per_prompt
    )
    result, images = decode_and_score(policy, reward, rollout, spec.chunk)

    def gathered(t: Tensor) -> Tensor:
        return env.all_gather_cat(t.float().contiguous())[: len(prompts)]

    total, images = gathered(result.total), gathered(images)
    metrics = {"eval/reward_mean": float(total.mean())}
    for name, value in result.components.items():
        metrics[f"eval/reward/{name}"] = float(gathered(value).mean())
    details: dict[str, Any] = {}
    for key, value in task.evaluate(images, prompts).items():
        if isinstance(value, (int, float)):
            metrics[f"eval/{key}"] = float(value)
        else:
            details[key] = value
    return EvalResult(metrics=metrics, images=images.cpu(), prompts=prompts, details=details)
