"""Network-row and FLOP counting (advantageflow/compute.py) against hand counts: the MLP's
FLOPs from its layer sizes, rows from the calls made."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import FlopCounterMode

from advantageflow.compute import BWD, EVAL_FLOPS, EVAL_FWD, FLOPS, FWD, ComputeMeter
from advantageflow.models.base import guided
from advantageflow.models.toy import ToyMLPPolicy, VelocityMLP

DIM, HIDDEN, DEPTH, TIME_DIM = 2, 16, 3, 8


def mlp_forward_flops_per_row() -> int:
    """2 * in * out per Linear and row: (D + T) -> H, (DEPTH - 1) x H -> H, H -> D."""
    sizes = [(DIM + TIME_DIM, HIDDEN)] + [(HIDDEN, HIDDEN)] * (DEPTH - 1) + [(HIDDEN, DIM)]
    return sum(2 * i * o for i, o in sizes)


def _net() -> VelocityMLP:
    torch.manual_seed(0)
    return VelocityMLP(DIM, HIDDEN, DEPTH, TIME_DIM)


def test_flops_per_row_match_the_analytic_mlp_count():
    net = _net()
    meter = ComputeMeter([net])
    with torch.no_grad():
        net(torch.randn(5, DIM), torch.rand(5))
    (per_row,) = meter.flops_per_row.values()
    assert per_row == mlp_forward_flops_per_row()
    counts = meter.take()
    assert counts[FWD] == 5 and counts[BWD] == 0 and counts[FLOPS] == 5 * per_row
    # Another batch size of the same signature is not measured again, only multiplied.
    with torch.no_grad():
        net(torch.randn(7, DIM), torch.rand(7))
    assert len(meter.flops_per_row) == 1 and meter.take()[FLOPS] == 7 * per_row
    assert meter.flops_supported


def test_backward_rows_and_flops():
    net = _net()
    meter = ComputeMeter([net])
    f = mlp_forward_flops_per_row()
    out = net(torch.randn(4, DIM), torch.rand(4))
    assert meter.take() == {FWD: 4, BWD: 0, FLOPS: 4 * f, EVAL_FWD: 0, EVAL_FLOPS: 0}  # no backward yet
    out.square().sum().backward()
    assert meter.take() == {FWD: 0, BWD: 4, FLOPS: 2 * 4 * f, EVAL_FWD: 0, EVAL_FLOPS: 0}
    # A forward with grad whose output gets no gradient has no backward rows.
    with torch.enable_grad():
        net(torch.randn(3, DIM), torch.rand(3))
    assert meter.take()[BWD] == 0


def test_backward_factor_is_the_flop_counters_own_for_linear_layers():
    """The convention backward = 2 x forward, checked against FlopCounterMode on a real backward
    (input gradients needed, as in DRaFT): one product for dX and one for dW per Linear."""
    net = _net()
    x = torch.randn(6, DIM, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.rand(6)).sum().backward()
    assert counter.get_total_flops() == 3 * 6 * mlp_forward_flops_per_row()


def _metered_backward(net: nn.Module, rows: int) -> tuple[float, float, float]:
    """One forward and backward of ``net`` (input gradient needed): the meter's forward and
    backward FLOPs, and FlopCounterMode's own count of that backward."""
    meter = ComputeMeter([net])
    out = net(torch.randn(rows, DIM, requires_grad=True), torch.rand(rows))
    fwd = meter.take()[FLOPS]
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return fwd, meter.take()[FLOPS], counter.get_total_flops()


def test_frozen_layers_count_their_input_gradient_only():
    """Layers with frozen weights (what ``model.train_only`` leaves out) compute no weight
    gradient: the meter's backward count equals FlopCounterMode's own count of a real backward,
    and is below the all-trainable convention by those layers' forward FLOPs."""
    net = _net()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for layer in linears[1:3]:
        layer.requires_grad_(False)
    fwd, bwd, counted = _metered_backward(net, 6)
    frozen_fwd = 6 * 2 * HIDDEN * HIDDEN * 2  # two frozen H -> H layers
    assert bwd == counted and fwd == 6 * mlp_forward_flops_per_row() and bwd == 2 * fwd - frozen_fwd


def test_lora_backward_is_the_flop_counters_own():
    """A peft LoRA adapter: the base layers are frozen, the adapter's are trained."""
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["net.2", "net.4"]), _net())
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    fwd, bwd, counted = _metered_backward(net, 5)
    assert bwd == counted < 2 * fwd


def test_policy_passes_reference_old_cfg_and_evaluation_are_counted():
    policy = ToyMLPPolicy(_net())
    meter = ComputeMeter.for_policy(policy)
    x, t = torch.randn(3, DIM), torch.rand(3)
    with torch.no_grad():
        policy.velocity(x, t)
        with policy.reference():  # the frozen copy: a second network, also counted
            policy.velocity(x, t)
        with policy.use_parameters(policy.snapshot()):  # old / EMA: swapped parameters
            policy.velocity(x, t)
    with meter.evaluating():
        with torch.no_grad():
            policy.velocity(x, t)
    counts = meter.take()
    f = mlp_forward_flops_per_row()
    assert counts[FWD] == 9 and counts[FLOPS] == 9 * f
    assert counts[EVAL_FWD] == 3 and counts[EVAL_FLOPS] == 3 * f


class _GuidedToy(ToyMLPPolicy):
    """CFG in one doubled batch, as the DiT and diffusers adapters do."""

    def velocity(self, x, t, cond=None, guidance_scale=1.0):
        if guidance_scale == 1.0:
            return self._active(x, t)
        v_c, v_u = self._active(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return guided(v_c, v_u, guidance_scale)


def test_guidance_doubling_counts_the_rows_the_network_sees():
    policy = _GuidedToy(_net())
    meter = ComputeMeter.for_policy(policy)
    with torch.no_grad():
        policy.velocity(torch.randn(5, DIM), torch.rand(5), guidance_scale=3.0)
    assert meter.take()[FWD] == 10


def test_a_failing_forward_leaves_no_flop_counter_behind():
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    hooked = Boom()
    meter = ComputeMeter([hooked])
    with pytest.raises(ValueError, match="boom"):
        hooked(torch.zeros(2, 1))
    assert _get_current_dispatch_mode() is None
    assert meter.take()[FWD] == 0 and not meter.flops_per_row


def test_policy_without_networks_counts_nothing():
    from tests.policies import PerSamplePolicy

    meter = ComputeMeter.for_policy(PerSamplePolicy(2, 2))
    assert not meter.active and not meter.flops_supported


def test_flops_off_still_counts_rows():
    net = _net()
    meter = ComputeMeter([net], measure_flops=False)
    with torch.no_grad():
        net(torch.randn(4, DIM), torch.rand(4))
    counts = meter.take()
    assert counts[FWD] == 4 and counts[FLOPS] == 0 and not meter.flops_supported
