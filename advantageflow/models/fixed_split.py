"""A GroupNorm whose bits do not depend on the torch thread count.

Why: ATen's CPU GroupNorm kernels split their work over the intra-op threads, and at some sizes
and layouts the result follows the split (torch 2.13.0+cpu, measured 2026-12-05):

* the *input gradient* with 6 channels per group at 16x16 (the shipped U-Net's half
  resolution) differs between 1 and 2 threads; a pretraining run drifted from the 2-thread
  one from step ~200 (issue 13);
* the *forward pass* of a channels-last input (the U-Net's upsampled maps and transposed
  token sequences run ATen's channels-last kernels) differs at 3 threads from 1, 2 and 4.

What it does: ATen's own kernels, called as ``F.group_norm`` and its autograd call them (same
memory layout), run at a fixed intra-op thread count, :data:`KERNEL_THREADS` = 2, whatever the
process's count: the split, and with it every result, is the one of 2 threads.  2 because the
shipped U-Net was made at 2 threads, so its weights stay the ones this module reproduces (at 2
threads the bits are ``nn.GroupNorm``'s).  The cost: these kernels use 2 threads on a larger
machine (a small part of a step).  CUDA tensors and other dtypes take ``nn.GroupNorm``'s path.

Only GroupNorm is pinned so: it is the one kernel found on the Intel Xeon that differs between
1 and 2 threads.  (Where MKL resolved no code path, the AMD EPYCs, GEMMs of a few rows differ too;
pinning every linear layer there was tried on 2026-12-05 and dropped: raising a 1-thread process to 2 threads
that often made two 1-thread runs on a 2-core machine 2-5x slower.  README, Reproducibility.)
At odd counts (3, 6) more kernels follow the split -- the elementwise SiLU, sigmoid and
tanh-GELU compute the last elements of a slice that does not end on a vector boundary with
scalar code that rounds differently (checked), and oneDNN's convolution forward -- so runs
repeat at 1, 2 and 4 threads, not reliably at 3 (README, Reproducibility).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.numerics import KERNEL_THREADS, intra_op_threads

__all__ = ["KERNEL_THREADS", "FixedSplitGroupNorm"]


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout ATen's ``group_norm`` runs a CPU input in (its ``suggest_memory_format``):
    channels-last for a channels-last input (a transposed token sequence, an upsampled map),
    contiguous otherwise.  The channels-last kernels sum in another order, so matching the
    layout is what keeps the bits ``nn.GroupNorm``'s."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _GroupNormFixedSplit(torch.autograd.Function):
    """``native_group_norm`` and its backward, both at :data:`KERNEL_THREADS` threads."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float) -> Tensor:
        fmt = _memory_format(x)
        x = x.contiguous(memory_format=fmt)
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        with intra_op_threads(KERNEL_THREADS):
            y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.sizes, ctx.fmt = (n, c, hw, groups), fmt
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        # The input gradient is always computed: ATen's channels-last kernel crashes (segfault,
        # torch 2.13.0+cpu) when asked for the weight gradients alone, as when every layer
        # below this one is frozen (model.train_only); it is returned only where asked for.
        mask = [True, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with intra_op_threads(KERNEL_THREADS):
            grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
                grad_y.contiguous(memory_format=ctx.fmt), x, mean, rstd, weight, *ctx.sizes, mask
            )
        return grad_x if ctx.needs_input_grad[0] else None, grad_w, grad_b, None, None


class FixedSplitGroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (same parameters and state dict) whose CPU float32 kernels
    run at a fixed thread count (module docstring).  ``(B, C, *) -> (B, C, *)``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 3:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        # with or without gradients (rollouts, evaluation): the same kernels at the same split
        return _GroupNormFixedSplit.apply(x, self.weight, self.bias, self.num_groups, self.eps)
