"""CompositeReward arithmetic and the background scorer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from advantageflow.rewards import CompositeReward, RewardError, RewardResult, build_reward
from advantageflow.rewards.async_scoring import AsyncRewardScorer


def images(batch=4, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Mean:
    differentiable = True

    def __call__(self, x, prompts, metadata):
        return x.flatten(1).mean(1)


class Parts:
    def __call__(self, x, prompts, metadata):
        return {"score": torch.arange(x.shape[0]).float(), "aux": torch.ones(x.shape[0])}


class AsyncLength:
    async def __call__(self, x, prompts, metadata):
        await asyncio.sleep(0)
        return [float(len(p)) for p in prompts]


class Sleepy:
    def __init__(self, delay):
        self.delay, self.threads = delay, set()

    def __call__(self, x, prompts, metadata):
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return x.flatten(1).sum(1)


def test_weighted_sum_and_components():
    x = images()
    prompts = ["a", "bb", "ccc", "dddd"]
    jpeg = build_reward("jpeg_incompressibility")
    comp = CompositeReward({"jpeg": jpeg, "mean": Mean(), "len": AsyncLength()},
                           {"jpeg": 0.5, "mean": -2.0, "len": 3.0})
    res = comp(x, prompts, [{}] * 4)
    assert isinstance(res, RewardResult)
    j, m = jpeg(x, prompts, [{}] * 4), x.flatten(1).mean(1)
    length = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(res.total, 0.5 * j - 2.0 * m + 3.0 * length)
    assert set(res.components) == {"jpeg", "mean", "len"}
    assert torch.equal(res.components["len"], length)  # components are raw, unweighted
    assert res.weights == {"jpeg": 0.5, "mean": -2.0, "len": 3.0}
    assert comp.differentiable is False  # jpeg is not differentiable


def test_named_parts_and_errors():
    x = images()
    res = CompositeReward({"p": Parts(), "m": Mean()}, {"p": 2.0, "m": 1.0})(x, [""] * 4, [{}] * 4)
    assert torch.allclose(res.total, 2.0 * torch.arange(4.0) + x.flatten(1).mean(1))
    assert torch.equal(res.components["p/aux"], torch.ones(4))

    class NoScore:
        def __call__(self, x, p, m):
            return {"a": torch.zeros(4), "b": torch.zeros(4)}

    class WrongShape:
        def __call__(self, x, p, m):
            return torch.zeros(3)

    with pytest.raises(RewardError, match="must be 'score'"):
        CompositeReward({"n": NoScore()}, {"n": 1.0})(x, [""] * 4, [{}] * 4)
    with pytest.raises(RewardError, match=r"expected \(4,\)"):
        CompositeReward({"w": WrongShape()}, {"w": 1.0})(x, [""] * 4, [{}] * 4)
    assert CompositeReward({"m": Mean()}, {"m": 1.0}).differentiable is True


def test_composite_gradient_is_weighted():
    x = images(2).requires_grad_(True)
    comp = CompositeReward({"a": Mean(), "b": Mean()}, {"a": 3.0, "b": -1.0})
    comp(x, ["", ""], [{}, {}]).total.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0 / x[0].numel()))


def test_async_matches_sync_and_copies_inputs():
    reward = CompositeReward({"jpeg": build_reward("jpeg_compressibility"), "m": Mean()}, {"jpeg": 1.0, "m": 1.0})
    batches = [images(4, seed=s) for s in range(3)]
    expected = [reward(b, [""] * 4, [{}] * 4).total for b in batches]
    with AsyncRewardScorer(reward) as scorer:
        futures = []
        for b in batches:
            futures.append(scorer.submit(b, [""] * 4))
            b.zero_()  # the caller reuses its buffer: the scorer kept a copy
        got = [f.result().total for f in futures]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_async_overlaps_with_work_in_the_caller():
    reward = Sleepy(0.5)
    with AsyncRewardScorer(reward) as scorer:
        start = time.monotonic()
        future = scorer.submit(images(2), ["", ""])
        time.sleep(0.5)  # "sampling the next batch"
        future.result()
        elapsed = time.monotonic() - start
    assert elapsed < 0.85  # serial would be >= 1.0
    assert threading.get_ident() not in reward.threads


def test_async_errors_surface_from_the_future():
    class Broken:
        def __call__(self, x, p, m):
            raise RewardError("reward server gone")

    with AsyncRewardScorer(Broken()) as scorer:
        with pytest.raises(RewardError, match="gone"):
            scorer.submit(images(1), [""]).result()
    with pytest.raises(ValueError, match="workers"):
        AsyncRewardScorer(Mean(), workers=0)


def test_process_workers_build_their_own_reward():
    x = images(3, 32)
    expected = build_reward("jpeg_incompressibility", {"quality": 70})(x, [""] * 3, [{}] * 3)
    scorer = AsyncRewardScorer.from_name("jpeg_incompressibility", {"quality": 70}, workers=1)
    try:
        out = scorer.submit(x, [""] * 3).result(timeout=120)
    finally:
        scorer.shutdown()
    assert torch.equal(out["reward"], expected)
