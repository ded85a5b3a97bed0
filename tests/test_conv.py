"""InvariantConv2d (advantageflow/models/conv.py): the same values and gradients as nn.Conv2d up
to float rounding, the same bits at 1, 2 and 4 torch threads, ATen's path where the fast ones do
not apply, and oneDNN left as the caller set it.  Both weight-gradient paths are tested: the
offset GEMMs (where MKL resolved a code path) and ATen's (where it did not, e.g. the AMD EPYC),
by forcing ``gemms_are_thread_invariant``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advantageflow.models import conv
from advantageflow.models.conv import InvariantConv2d, _offset_weight_grad
from advantageflow.numerics import blas_mode, thread_invariant_kernels

# (in, out, kernel, stride, padding, batch, side): the shipped DiT's stem / residual / head /
# patch embedding, a 5x5, a single image, an odd side, and two shapes that keep ATen's path
SHAPES = [
    (3, 16, 3, 1, 1, 7, 32), (16, 16, 3, 1, 1, 64, 32), (16, 3, 3, 1, 1, 1, 32),
    (16, 128, 4, 4, 0, 9, 32), (8, 8, 5, 1, 2, 3, 12), (4, 6, 3, 1, 1, 2, 9),
    (16, 32, 3, 2, 1, 4, 16), (4, 4, 3, 1, 0, 2, 10),
]


def _forward_backward(module: nn.Conv2d, cin: int, batch: int, side: int, threads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, side, side, generator=gen, requires_grad=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with thread_invariant_kernels():
            module.zero_grad()
            y = module(x)
            y.backward(torch.randn(y.shape, generator=gen))
    finally:
        torch.set_num_threads(previous)
    return [y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()]


def _pair(cin, cout, k, stride, pad) -> tuple[InvariantConv2d, nn.Conv2d]:
    torch.manual_seed(1)
    fast = InvariantConv2d(cin, cout, k, stride=stride, padding=pad)
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture(params=[True, False], ids=["gemm-weight-grad", "aten-weight-grad"])
def gemm_paths(request, monkeypatch):
    monkeypatch.setattr(conv, "gemms_are_thread_invariant", lambda: request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_match_nn_conv2d(shape, gemm_paths):
    cin, cout, k, stride, pad, batch, side = shape
    fast, ref = _pair(cin, cout, k, stride, pad)
    got = _forward_backward(fast, cin, batch, side, 1)
    want = _forward_backward(ref, cin, batch, side, 1)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("shape", SHAPES[:6], ids=lambda s: "x".join(map(str, s)))
def test_bits_do_not_depend_on_the_thread_count(shape, gemm_paths):
    if blas_mode()["strict"] is False:
        pytest.fail("MKL is not in strict mode: something used MKL before advantageflow was imported")
    cin, cout, k, stride, pad, batch, side = shape
    fast, _ = _pair(cin, cout, k, stride, pad)
    one = _forward_backward(fast, cin, batch, side, 1)
    for threads in (2, 4):  # README, Reproducibility: 1, 2 or 4 threads
        other = _forward_backward(fast, cin, batch, side, threads)
        for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), one, other):
            assert torch.equal(a, b), f"{name} differs between 1 and {threads} threads"


def test_fast_paths_are_taken_only_where_they_apply(monkeypatch):
    monkeypatch.setattr(conv, "gemms_are_thread_invariant", lambda: True)
    x = torch.zeros(2, 4, 8, 8)
    assert InvariantConv2d(4, 4, 3, padding=1)._fast_path(x) == "same"
    assert InvariantConv2d(4, 8, 4, stride=4)._fast_path(x) == "patchify"
    assert InvariantConv2d(4, 8, 3, stride=2, padding=1)._fast_path(x) == ""  # strided
    assert InvariantConv2d(4, 8, 3, padding=0)._fast_path(x) == ""  # not "same"
    assert InvariantConv2d(4, 8, 3, padding=1)._fast_path(x.double()) == ""  # float32 only
    assert InvariantConv2d(4, 8, 3, padding=1, groups=2)._fast_path(x) == ""
    assert InvariantConv2d(4, 8, 3, stride=3)._fast_path(x) == ""  # 8 is not a multiple of 3
    monkeypatch.setattr(conv, "gemms_are_thread_invariant", lambda: False)
    assert InvariantConv2d(4, 8, 4, stride=4)._fast_path(x) == ""  # patchify is all GEMM
    assert InvariantConv2d(4, 4, 3, padding=1)._fast_path(x) == "same"  # oneDNN, ATen's weight gradient


@pytest.mark.parametrize(("strict", "branch", "want"), [
    (True, "AVX512_E1", True), (True, "AVX2", True), (True, "AUTO", False), (False, "AVX512_E1", False),
    (None, None, False),
])
def test_gemm_paths_only_where_mkl_resolved_a_code_path(monkeypatch, strict, branch, want):
    mode = {"blas": "MKL", "mkl_cbwr": "", "strict": strict, "mkl_branch": branch}
    monkeypatch.setattr(conv, "blas_mode", lambda: mode)
    conv.gemms_are_thread_invariant.cache_clear()
    try:
        assert conv.gemms_are_thread_invariant() is want
    finally:
        monkeypatch.undo()
        conv.gemms_are_thread_invariant.cache_clear()


def test_the_offset_gemms_are_the_convolution_weight_gradient_in_float64():
    """The k*k-GEMM weight gradient against autograd of F.conv2d, exactly enough in float64."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64)
    torch.nn.functional.conv2d(x, w, padding=1).backward(grad)
    torch.testing.assert_close(_offset_weight_grad(x, grad, 3, 1), w.grad, rtol=1e-12, atol=1e-12)


def test_onednn_setting_is_left_as_the_caller_set_it():
    conv = InvariantConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for setting in (False, True):
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = setting
        try:
            conv(x).sum().backward()
            assert torch.backends.mkldnn.enabled is setting
        finally:
            torch.backends.mkldnn.enabled = previous


def test_state_dict_is_nn_conv2d_s():
    fast = InvariantConv2d(3, 4, 3, padding=1)
    assert isinstance(fast, nn.Conv2d)
    assert set(fast.state_dict()) == set(nn.Conv2d(3, 4, 3, padding=1).state_dict())


def test_a_channels_last_input_gives_nn_conv2d_s_values(monkeypatch):
    """Non-contiguous inputs (channels-last) on both fast paths."""
    monkeypatch.setattr(conv, "gemms_are_thread_invariant", lambda: True)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    for args in ((4, 8, 4, 4, 0), (4, 6, 3, 1, 1)):
        fast, ref = _pair(*args)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_atens_weight_gradient_is_capped_at_two_threads_never_raised(monkeypatch):
    """Where MKL resolved no code path the fallback weight gradient runs at most 2 threads:
    a 4-thread process lowers to 2 (the stem's gradient differed at 4 on the AVX512 AMD EPYC),
    a 1-thread process stays at 1 (raising it made two 1-thread runs oversubscribe 2 cores)."""
    from advantageflow.numerics import at_most_threads

    seen = []
    real = conv._same_conv_backward

    def spy(*args, **kwargs):
        if kwargs["which"] == 1:  # the weight gradient (the input's is oneDNN's, thread-invariant)
            seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "gemms_are_thread_invariant", lambda: False)
    monkeypatch.setattr(conv, "_same_conv_backward", spy)
    fast, _ = _pair(3, 8, 3, 1, 1)
    for threads in (1, 2, 4):
        _forward_backward(fast, 3, 2, 8, threads)
    assert seen == [1, 2, 2]
    previous = torch.get_num_threads()
    with at_most_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous
