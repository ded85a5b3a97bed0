"""Convolutions for the shipped ShapesDiT that are fast on the CPU *and* thread-invariant.

Why: training runs with oneDNN off (:func:`advantageflow.numerics.thread_invariant_kernels`),
because oneDNN's convolution *weight* gradient sums over batch and pixels in an order that
depends on the torch thread count.  ATen's fallback then computes the 3x3 convolutions with
NNPACK (forward) and its slow convolution backward, and the 4x4 patch embedding with a slow
im2col: on the 2-core Intel Xeon (torch's profiler, issue 13) those convolutions are about 15
of the 140 MFLOP of a forward row but took a third of a training step and 38% of a sampling
step.  With this module one main-job epoch there went from 8.6 s to 5.5-5.9 s
(``benchmarks/cpu_bounds.py``).

What runs instead, on CPU float32 only (anything else -- CUDA, bf16, strides -- keeps
``nn.Conv2d``'s own path):

* ``kernel == stride``, no padding (the patch embedding): a patchify reshape and one matrix
  product, ``(B*g*g, C*p*p) @ (C*p*p, D)``; forward and both gradients are MKL GEMMs.
* stride 1, "same" zero padding (every 3x3 convolution): the forward and the input gradient
  through oneDNN, whose kernels give each output element to one thread with a fixed reduction
  order (checked bit for bit at 1 and 2 threads in ``tests/test_conv.py``), and the weight
  gradient as ``k*k`` GEMMs, one per kernel offset ``(i, j)``:
  ``dW[:, :, i, j] = G (O, K) @ X_shifted (K, C)`` with ``K`` running over batch and pixels.
  Both operands are laid out as the zero-padded images, ``Wp = W + k - 1`` wide, flattened
  end to end, so the offset is a plain shift of ``i * Wp + j`` along ``K`` and no im2col copy
  (``k*k`` times the input) is made; ``G`` is zero on the padding, so products that would cross
  into a neighbouring image or row vanish.  MKL's strict CNR mode makes each GEMM independent of
  the thread count.  The bias gradient is a sum to ``O`` values, which ATen splits over the
  outputs, not over the summed elements, so it is thread-invariant too.

Where MKL runs in strict CNR mode on a code path it resolved for the CPU (``mkl_branch`` such as
``AVX512_E1``; :func:`advantageflow.numerics.blas_mode`), the GEMM paths above are used.  Where it
resolved none (branch ``AUTO``: the 2-core AMD EPYC) strict CNR was measured not to cover every
shape (README, "Reproducibility"), and thin GEMMs with a long ``K`` -- the offset GEMMs' shape --
are the kind it missed; there the weight gradient stays ATen's (``convolution_backward`` with
oneDNN off, measured thread-invariant for the shipped DiT at 1 and 2 threads on the AMD EPYCs),
run at most 2 threads (:func:`~advantageflow.numerics.at_most_threads`: on the AVX512 AMD EPYC of
2026-12-05 the 3-channel input convolution's weight gradient differed at 4 threads; a count fixed
at 2, raised for a 1-thread process too, made two 1-thread runs sharing the machine up to 4x slower),
and the patch
embedding stays ``nn.Conv2d``'s, while the oneDNN forward and input gradient are kept.

The modules subclass :class:`torch.nn.Conv2d` and keep its parameters, so state dicts, the
shipped weights and LoRA targets are unchanged.  The results differ from ATen's in the last
float bits (different summation order), not in value.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.numerics import KERNEL_THREADS, at_most_threads, blas_mode, onednn

# MKL branches that say "MKL picked no code path for this CPU" (strict CNR then does not cover every GEMM)
_UNRESOLVED_BRANCHES = (None, "OFF", "BRANCH_OFF", "AUTO", "unknown")


@functools.lru_cache(maxsize=1)
def gemms_are_thread_invariant() -> bool:
    """True where MKL's strict CNR runs on a code path it resolved for this CPU (module docstring)."""
    mode = blas_mode()
    return bool(mode["strict"]) and mode["mkl_branch"] not in _UNRESOLVED_BRANCHES


def _same_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, pad: int, which: int, use_onednn: bool) -> Tensor:
    """One of ATen's stride-1 convolution gradients (``which``: 0 input, 1 weight) with oneDNN on or off."""
    mask = [which == 0, which == 1, False]
    with onednn(use_onednn):
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask
        )[which]


def _offset_weight_grad(x: Tensor, grad: Tensor, k: int, pad: int) -> Tensor:
    """``dL/dW`` ``(O, C, k, k)`` of a stride-1 "same" convolution as ``k*k`` GEMMs.

    ``x`` ``(B, C, H, W)`` the input, ``grad`` ``(B, O, H, W)`` the output gradient.
    """
    b, c, h, w = x.shape
    o = grad.shape[1]
    wp = w + 2 * pad
    frame_rows = h + 2 * pad + 1  # one spare row: the largest offset runs k-1 past the last row
    frame = frame_rows * wp
    # (C, B * frame): the zero-padded images end to end, plus room for the largest shift
    xs = F.pad(x, (pad, pad, pad, pad + 1)).transpose(0, 1).reshape(c, b * frame)
    xs = F.pad(xs, (0, (k - 1) * wp + k - 1))
    # (O, B * frame): the gradient at the top-left of each frame, zero elsewhere
    gs = F.pad(grad, (0, wp - w, 0, frame_rows - h)).transpose(0, 1).reshape(o, b * frame)
    n = b * frame
    rows = [torch.mm(gs, xs[:, i * wp + j : i * wp + j + n].t()) for i in range(k) for j in range(k)]
    return torch.stack(rows, dim=-1).view(o, c, k, k)


class _SameConvFunction(torch.autograd.Function):
    """Stride-1, zero-padded "same" convolution: oneDNN forward / input gradient, GEMM weight
    gradient (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pad: int) -> Tensor:  # noqa: D102
        with onednn(True):
            out = F.conv2d(x, weight, bias, padding=pad)
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, weight = ctx.saved_tensors
        pad, k = ctx.pad, weight.shape[-1]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _same_conv_backward(grad, x, weight, pad, which=0, use_onednn=True)
        if ctx.needs_input_grad[1]:
            if gemms_are_thread_invariant():
                grad_w = _offset_weight_grad(x, grad, k, pad)
            else:  # ATen's own weight gradient, oneDNN off, at most 2 threads (module docstring)
                with at_most_threads(KERNEL_THREADS):
                    grad_w = _same_conv_backward(grad, x, weight, pad, which=1, use_onednn=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None


class InvariantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the fast thread-invariant CPU paths of this module where they apply."""

    def _fast_path(self, x: Tensor) -> str:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.groups != 1 or self.padding_mode != "zeros":
            return ""
        if self.dilation != (1, 1) or isinstance(self.padding, str):
            return ""
        kh, kw = self.kernel_size
        if self.stride == (kh, kw) and self.padding == (0, 0):
            if x.shape[-2] % kh == 0 and x.shape[-1] % kw == 0 and gemms_are_thread_invariant():
                return "patchify"
            return ""
        if self.stride == (1, 1) and kh == kw and kh % 2 == 1 and self.padding == (kh // 2, kh // 2):
            return "same"
        return ""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, O, H', W')``, as ``nn.Conv2d``."""
        path = self._fast_path(x)
        if path == "same":
            return _SameConvFunction.apply(x, self.weight, self.bias, self.padding[0])
        if path == "patchify":
            return self._patchify(x)
        return super().forward(x)

    def _patchify(self, x: Tensor) -> Tensor:
        """Non-overlapping ``p x p`` patches: one GEMM ``(B*gh*gw, C*ph*pw) @ (C*ph*pw, O)``."""
        b, c, h, w = x.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw)
        weight = self.weight.view(self.out_channels, -1)
        out = patches @ weight.t() if self.bias is None else torch.addmm(self.bias, patches, weight.t())
        return out.view(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)
