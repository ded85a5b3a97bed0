"""FixedSplitGroupNorm: ``nn.GroupNorm``'s bits at 2 threads, at any thread count; the same
parameters; ``nn.GroupNorm``'s own path where nothing needs fixing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advantageflow.models.fixed_split import KERNEL_THREADS, FixedSplitGroupNorm
from advantageflow.numerics import intra_op_threads

# (batch, channels, side): the shipped U-Net's half resolution (6 channels per group, where
# ATen's input gradient depends on the thread count), its full resolution and the DiT's maps
SIZES = [(64, 48, 16), (3, 48, 16), (8, 24, 32), (8, 16, 32)]


def _forward_backward(norm: nn.GroupNorm, x: torch.Tensor, grad_y: torch.Tensor, threads: int) -> list[torch.Tensor]:
    """Output, input gradient, weight and bias gradients ``norm`` gives with ``threads`` threads."""
    with intra_op_threads(threads):
        x = x.clone().requires_grad_(True)
        norm.zero_grad()
        y = norm(x)
        y.backward(grad_y)
        return [y.detach(), x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()]


def _pair(channels: int) -> tuple[nn.GroupNorm, FixedSplitGroupNorm]:
    torch.manual_seed(0)
    reference = nn.GroupNorm(8, channels)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    fixed = FixedSplitGroupNorm(8, channels)
    fixed.load_state_dict(reference.state_dict())
    return reference, fixed


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch,channels,side", SIZES)
def test_bits_are_groupnorms_at_two_threads_whatever_the_thread_count(batch, channels, side, layout):
    """Channels-last inputs (the U-Net's upsampled maps and transposed token sequences) run
    ATen's channels-last kernels, whose sums differ from the contiguous ones: a first version
    made every input contiguous and changed the U-Net's training bits."""
    reference, fixed = _pair(channels)
    x, grad_y = torch.randn(batch, channels, side, side), torch.randn(batch, channels, side, side)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    want = _forward_backward(reference, x, grad_y, KERNEL_THREADS)
    for threads in (1, 2, 3):
        got = _forward_backward(fixed, x, grad_y, threads)
        for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
            assert torch.equal(a, b), f"{name} at {threads} threads differs from nn.GroupNorm at {KERNEL_THREADS}"


def test_the_sizes_are_ones_where_atens_groupnorm_depends_on_the_thread_count():
    """The controls that make the tests here mean something (torch 2.13.0+cpu): plain
    ``nn.GroupNorm`` gives another input gradient at 1 thread than at 2 at the U-Net's half
    resolution, and another channels-last output at 3 threads than at 2 at its full one."""
    reference, _ = _pair(48)
    x, grad_y = torch.randn(64, 48, 16, 16), torch.randn(64, 48, 16, 16)
    one, two = (_forward_backward(reference, x, grad_y, t) for t in (1, 2))
    reference24, _ = _pair(24)
    x24 = torch.randn(8, 24, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), intra_op_threads(2):
        out2 = reference24(x24)
    with torch.no_grad(), intra_op_threads(3):
        out3 = reference24(x24)
    if torch.equal(one[1], two[1]) and torch.equal(out2, out3):
        pytest.skip("this torch build's GroupNorm is thread-invariant at these sizes: nothing to fix")
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])  # contiguous: only the input gradient


def test_thread_count_comes_back_and_state_dicts_match_nn_groupnorm():
    before = torch.get_num_threads()
    reference, fixed = _pair(16)
    _forward_backward(fixed, torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), threads=1)
    assert torch.get_num_threads() == before
    assert fixed.state_dict().keys() == reference.state_dict().keys()


def test_without_gradients_too_the_bits_do_not_depend_on_the_thread_count():
    """Rollouts and evaluation run without gradients: the channels-last forward (which
    differs at 3 threads in ATen) is fixed there too."""
    reference, fixed = _pair(24)
    x = torch.randn(8, 24, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), intra_op_threads(KERNEL_THREADS):
        want = reference(x)
    for threads in (1, 3):
        with torch.no_grad(), intra_op_threads(threads):
            assert torch.equal(fixed(x), want)


def test_double_and_low_rank_inputs_take_groupnorms_own_path():
    reference, fixed = _pair(16)
    x = torch.randn(2, 16, 5, 5)
    xd = x.double().requires_grad_(True)
    assert torch.equal(fixed.double()(xd), reference.double()(xd))
    flat = torch.randn(4, 16)
    assert torch.equal(fixed.float()(flat), reference.float()(flat))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_gradients_alone_where_the_input_needs_none(layout):
    """Below a frozen stack (``model.train_only``) the input needs no gradient; ATen's
    channels-last backward asked for the weight gradients alone crashes the process (found
    2026-12-05), so the input gradient is computed anyway and dropped.  The weight and bias
    gradients are the ones a full backward gives."""
    _, fixed = _pair(16)
    x, grad_y = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    want = _forward_backward(fixed, x, grad_y, KERNEL_THREADS)
    fixed.zero_grad()
    fixed(x).backward(grad_y)  # x does not require grad
    assert torch.equal(fixed.weight.grad, want[2]) and torch.equal(fixed.bias.grad, want[3])
