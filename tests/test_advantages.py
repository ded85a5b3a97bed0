"""Group-relative advantages against hand-computed cases."""

from __future__ import annotations

import math

import torch

from advantageflow.advantages import combined_advantages, group_advantages


def test_global_std_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 1, 1])
    out = group_advantages(r, g, std="global", eps=0.0)
    # group means 2, 2; global population std of [1,3,2,2] = sqrt(0.5)
    s = math.sqrt(0.5)
    assert torch.allclose(out.values, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    assert out.zero_std_ratio == 0.5
    assert out.zero_std.tolist() == [False, False, True, True]


def test_group_std_and_none():
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    g = torch.tensor([5, 5, 7, 7])
    grp = group_advantages(r, g, std="group", eps=0.0)
    assert torch.allclose(grp.values, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    none = group_advantages(r, g, std="none")
    assert torch.allclose(none.values, torch.tensor([-1.0, 1.0, -2.0, 2.0]))


def test_clipping_and_eps():
    r = torch.tensor([0.0] * 9 + [100.0])
    g = torch.zeros(10, dtype=torch.long)
    out = group_advantages(r, g, std="group", clip=2.0)
    assert float(out.values.max()) == 2.0
    assert float(out.values.min()) > -2.0
    one = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), std="group", eps=1e-4)
    assert torch.allclose(one.values, torch.tensor([-0.5, 0.5]) / (0.5 + 1e-4))


def test_interleaved_groups_and_order_independence():
    r = torch.tensor([1.0, 10.0, 3.0, 30.0])
    g = torch.tensor([0, 1, 0, 1])
    out = group_advantages(r, g, std="group", eps=0.0)
    assert torch.allclose(out.values, torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_per_reward_normalisation_then_sum():
    g = torch.tensor([0, 0, 0, 0])
    comps = {"a": torch.tensor([0.0, 1.0, 0.0, 1.0]), "b": torch.tensor([0.0, 0.0, 10.0, 10.0])}
    out = combined_advantages(comps, {"a": 1.0, "b": 0.5}, g, std="group", eps=0.0)
    # a -> [-1, 1, -1, 1], b -> [-1, -1, 1, 1]; a + 0.5 b
    assert torch.allclose(out.values, torch.tensor([-1.5, 0.5, -0.5, 1.5]))
    assert out.zero_std_ratio == 0.0
    # the weighted sum stays within the run's one clip
    clipped = combined_advantages(comps, {"a": 1.0, "b": 0.5}, g, std="group", clip=1.2, eps=0.0)
    assert torch.allclose(clipped.values, torch.tensor([-1.2, 0.5, -0.5, 1.2]))
