"""The trainer puts every policy in eval mode for rollouts and evaluation (no dropout) and in
train mode for the updates (:meth:`advantageflow.models.base.FlowPolicy.set_mode`)."""

from __future__ import annotations

import torch

from advantageflow.config import load_config
from advantageflow.rollouts import SamplingSpec, generate
from advantageflow.runlog import read_metrics
from advantageflow.seeding import eval_noise_key
from advantageflow.tasks.base import Prompt
from advantageflow.trainer import train
from tests.conftest import REPO
from tests.policies import DropoutToyPolicy, DropoutVelocity

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def _samples(policy) -> torch.Tensor:
    n = 32
    return generate(policy, [Prompt("")] * n, [eval_noise_key(0, i) for i in range(n)], [0] * n,
                    SamplingSpec(policy.time_grid(4), "euler")).x0


def test_set_mode_switches_dropout_off_for_sampling(toy_cache):
    cfg = DropoutToyPolicy.Config(cache_dir=toy_cache, pretrain_steps=1500, dropout=0.5)
    policy = DropoutToyPolicy.from_config(cfg)
    plain = DropoutToyPolicy.from_config(DropoutToyPolicy.Config(cache_dir=toy_cache, pretrain_steps=1500,
                                                                 dropout=0.0))
    policy.set_mode(training=False)
    assert torch.equal(_samples(policy), _samples(plain))
    policy.set_mode(training=True)  # the failure this guards against: dropout on in rollouts
    assert not torch.allclose(_samples(policy), _samples(plain))


def test_trainer_samples_in_eval_mode_and_updates_in_train_mode(tmp_path, toy_overrides):
    base = toy_overrides + ["train.epochs=1", "eval.every=1", "eval.samples_per_prompt=64",
                            "model.name=tests.policies:DropoutToyPolicy"]
    DropoutVelocity.MODES.clear()
    with_dropout = train(load_config(TOY, base + ["model.dropout=0.5"]), tmp_path / "dropout")
    modes = list(DropoutVelocity.MODES)
    without = train(load_config(TOY, base + ["model.dropout=0.0"]), tmp_path / "plain")
    # Rollouts (the epoch's rewards) and evaluation equal the dropout-free network's.
    rewards = [[r["reward/mean"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "reward/mean" in r]
               for run in ("dropout", "plain")]
    assert rewards[0] == rewards[1]
    assert with_dropout.eval_before == without.eval_before
    # Every pass that builds a graph runs in train mode; sampling passes ran in eval mode.
    assert {training for grad, training in modes if grad} == {True}
    assert (False, False) in modes
