"""Score a batch while the next one is being sampled.

``AsyncRewardScorer(reward).submit(images, prompts, metadata)`` returns a
:class:`concurrent.futures.Future` of the reward's output (a ``RewardResult`` for a
:class:`~advantageflow.rewards.base.CompositeReward`).  The images are detached and copied at
submission, so the caller may reuse its buffers.

Two kinds of workers:

* ``thread`` (default): the reward object runs on ``workers`` threads of this process.  Good
  when the reward's heavy part releases the GIL: torch kernels, tesseract subprocesses, PIL
  encoders, HTTP calls to a reward server.
* ``process``: ``workers`` spawned processes each build their own reward from
  ``(name, args)`` (:meth:`AsyncRewardScorer.from_name`); samples travel to them through
  :mod:`multiprocessing` (local pipes only).  For rewards that hold the GIL in Python.

With one worker, results come back in submission order and the reward is never called
concurrently (rewards need not be thread-safe).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from torch import Tensor

from advantageflow.rewards.base import as_components, build_reward, call_reward

_PROCESS_REWARD: Any = None


def _init_process(name: str, args: dict) -> None:
    global _PROCESS_REWARD
    _PROCESS_REWARD = build_reward(name, args)


def _score_in_process(images: Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, Tensor]:
    out = call_reward(_PROCESS_REWARD, images, prompts, metadata)
    return {k: v.detach().cpu() for k, v in as_components(out, "reward", images.shape[0]).items()}


class AsyncRewardScorer:
    """Run a reward in the background; see the module docstring.

    Args:
        reward: any reward callable (sync or async).
        workers: threads scoring at once (1 keeps calls serial and in order).
    """

    def __init__(self, reward: Any, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("AsyncRewardScorer needs workers >= 1")
        self.reward = reward
        self.kind = "thread"
        self._pool: Executor = ThreadPoolExecutor(workers, thread_name_prefix="reward")

    @classmethod
    def from_name(cls, name: str, args: dict | None = None, workers: int = 1,
                  kind: str = "process") -> AsyncRewardScorer:
        """Build reward ``name`` with ``args`` in ``workers`` spawned processes (or threads).

        In a process pool the future holds ``dict[str, Tensor]`` of ``(B,)`` components (a
        single reward gives ``{"reward": scores}``).
        """
        if kind == "thread":
            return cls(build_reward(name, args), workers)
        if kind != "process":
            raise ValueError(f"unknown worker kind '{kind}' (thread, process)")
        if workers < 1:
            raise ValueError("AsyncRewardScorer needs workers >= 1")
        self = cls.__new__(cls)
        self.reward, self.kind = None, "process"
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_process, initargs=(name, dict(args or {})))
        return self

    def submit(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> Future:
        """Queue ``(B, ...)`` samples for scoring; returns a future of the reward's output."""
        images = images.detach().clone()
        prompts = list(prompts)
        metadata = [dict(m) for m in metadata] if metadata else [{} for _ in prompts]
        if self.kind == "process":
            return self._pool.submit(_score_in_process, images.cpu(), prompts, metadata)
        return self._pool.submit(call_reward, self.reward, images, prompts, metadata)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> AsyncRewardScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=exc[0] is None)
