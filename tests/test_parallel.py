"""The strategies' single-process logic and the helpers that keep FSDP2 shards out of the way
(the two-process behaviour is in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advantageflow.config import DistConfig, load_config
from advantageflow.configbase import ConfigError
from advantageflow.distributed import DistEnv, full_tensor, full_tensors, is_sharded, local_tensor, placed_like
from advantageflow.evaluation import eval_stripe
from advantageflow.models.dit import ShapesDiTPolicy
from advantageflow.models.toy import ToyMLPPolicy, VelocityMLP
from advantageflow.parallel import DDP, FSDP, Local, finite_gradients, make_strategy, shard_units
from tests.conftest import REPO


@pytest.mark.parametrize("total", [1, 5, 192, 193])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_eval_stripes_are_equal_and_gather_back_to_the_samples_in_order(total, world):
    stripes = [eval_stripe(total, world, r) for r in range(world)]
    assert len({len(s) for s in stripes}) == 1  # equal sizes: all_gather needs them
    gathered = [i for s in stripes for i in s][:total]
    assert gathered == list(range(total))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "allreduce"])
def test_one_process_is_the_identity_whatever_the_strategy(name):
    strategy = make_strategy(DistConfig(strategy=name), DistEnv())
    assert type(strategy) is Local and strategy.loss_scale == 1.0 and not strategy.lockstep
    policy = ToyMLPPolicy(VelocityMLP(2, 8, 2))
    before = policy._active
    strategy.wrap(policy)
    assert policy._active is before


def test_multi_process_strategies_scale_losses_by_the_world_because_wrappers_average():
    env = DistEnv(rank=0, world_size=4)
    for cls in (DDP, FSDP):
        strategy = cls(env, DistConfig())
        assert strategy.loss_scale == 4.0 and strategy.lockstep


def test_wrapping_a_policy_without_networks_is_a_config_error():
    from tests.policies import PerSamplePolicy

    with pytest.raises(ConfigError, match="dist.strategy=allreduce"):
        DDP(DistEnv(rank=0, world_size=2), DistConfig()).wrap(PerSamplePolicy(2, 2))


def test_shard_units_are_the_blocks_of_top_level_module_lists():
    policy = ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config())
    units = shard_units(policy.net)
    blocks = [m for child in policy.net.children() if isinstance(child, nn.ModuleList) for m in child]
    assert units == blocks and len(units) >= 2
    assert shard_units(VelocityMLP(2, 8, 2)) == []  # a small MLP is one unit


def test_tensor_helpers_leave_plain_tensors_alone():
    x = torch.randn(3, 2)
    assert not is_sharded(x)
    assert full_tensor(x) is x and local_tensor(x) is x
    out = full_tensors({"a": [x, (x, 1)], "b": "s"})
    assert out["a"][0] is x and out["a"][1][0] is x and out["a"][1][1] == 1 and out["b"] == "s"
    assert isinstance(out["a"][1], tuple)
    y = placed_like(x.double(), torch.zeros(3, 2, dtype=torch.float32))
    assert y.dtype == torch.float32 and torch.equal(y, x)


def test_finite_gradients_sees_nan_and_ignores_missing_grads():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    assert finite_gradients([a, b])
    a.grad = torch.tensor([1.0, float("nan")])
    assert not finite_gradients([a, b])


def test_dist_section_is_validated_with_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'fsdp'"):
        load_config(None, ["dist.strategy=fdsp"])
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        load_config(None, ["dist.timeout_s=0"])
    assert load_config(None, ["dist.strategy=fsdp"]).dist.strategy == "fsdp"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_group_is_spread_over_the_processes_and_steps_are_covered_exactly(world):
    from advantageflow.rollouts import owned_rows

    total, steps, group = 128, 2, 8
    owned = [owned_rows(total, steps, world, r) for r in range(world)]
    per_step = total // steps
    for k in range(steps):  # each step's batch is the union of the processes' rows of step k
        step_rows = sorted(i for rows in owned for i in rows[k * per_step // world:(k + 1) * per_step // world])
        assert step_rows == list(range(k * per_step, (k + 1) * per_step))
    for g in range(total // group):  # every process holds group / world members of every group
        members = range(g * group, (g + 1) * group)
        assert all(sum(i in set(rows) for i in members) == group // world for rows in owned)


def test_a_world_size_that_does_not_divide_the_step_batch_is_a_clear_error_before_anything_runs(tmp_path):
    from advantageflow.trainer import TrainingError, train

    cfg = load_config(str(REPO / "configs" / "toy2d_advantageflow.yaml"))  # 64 samples per step
    with pytest.raises(TrainingError, match="64 samples per optimizer step .* over 3 processes"):
        train(cfg, tmp_path / "run", env=DistEnv(rank=0, world_size=3))
    assert not (tmp_path / "run").exists()
