"""A toy training run scored by a reward server on 127.0.0.1.

The 2-D task's samples are ``(B, 2)`` points, not images, so the client sends them as raw
float32 (``encoding: auto``) and the server scores exactly what an in-process reward would:
the run is identical to one with the local reward.  When the server fails, the run stops
with a ``RewardError`` and resumes from its last checkpoint to the same result.
"""

from __future__ import annotations

import pytest

from advantageflow.config import load_config
from advantageflow.rewards import RewardError
from advantageflow.rewards.server import serve
from advantageflow.runlog import read_metrics
from advantageflow.tasks.toy2d import ModeReward
from advantageflow.trainer import train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


class FailingFrom(ModeReward):
    """The toy reward that fails (HTTP 500 on the server) from its ``n``-th call."""

    def __init__(self, n: int) -> None:
        super().__init__([0, 1, 2])
        self.n, self.calls = n, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("reward model crashed")
        return super().__call__(images, prompts, metadata)


def rows(run_dir) -> list[dict]:
    """Training rows without the reward's own name (``reward/remote`` vs ``reward/toy2d_modes``)."""
    out = []
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "reward/mean" in r:
            out.append({k: v for k, v in r.items()
                        if k in ("step", "epoch", "reward/mean", "reward/std") or k.startswith(("loss/", "stats/"))})
    return out


def test_remote_reward_trains_like_local_and_resumes_after_server_failure(tmp_path, toy_overrides):
    base = toy_overrides + ["train.epochs=6", "eval.every=0", "checkpoint.every=2", "checkpoint.keep=5"]
    train(load_config(TOY, base), tmp_path / "local")
    reference = rows(tmp_path / "local")
    assert len(reference) == 6

    flaky = serve("toy2d_modes", reward=FailingFrom(5))  # one call per epoch: fails in epoch 5
    port = flaky.server_address[1]
    remote = base + ["reward.name=remote",
                     f"reward.args={{url: '{flaky.url}', retries: 1, backoff: 0.0, timeout: 30}}"]
    try:
        with pytest.raises(RewardError, match="failed after 2 attempts.*reward model crashed"):
            train(load_config(TOY, remote), tmp_path / "remote")
    finally:
        flaky.shutdown()
    assert rows(tmp_path / "remote") == reference[:4]  # bit-identical to the local reward
    ckpts = sorted(p.name for p in (tmp_path / "remote" / "checkpoints").iterdir())
    assert ckpts[-1] == "ckpt-000004"

    healthy = serve("toy2d_modes", {"modes": [0, 1, 2]}, port=port)  # back on the same address
    try:
        train(load_config(TOY, remote), tmp_path / "remote", resume=True)
    finally:
        healthy.shutdown()
    assert rows(tmp_path / "remote") == reference
