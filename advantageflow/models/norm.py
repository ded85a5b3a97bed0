"""A GroupNorm whose gradients do not depend on the torch thread count.

Why: ATen's CPU GroupNorm backward splits its work over the intra-op threads, and at some
sizes the *input* gradient's float sums follow that split: with 6 channels per group at 16x16
(the shipped U-Net's half resolution; torch 2.13.0+cpu) 1 and 2 threads give input gradients
that differ in the last bits, and a pretraining run drifted from step ~200 (issue 13).  The
forward pass and the weight / bias gradients are thread-invariant, and so is the input
gradient at the other sizes measured (2 and 3 channels per group at 32x32).

What it does: the same ATen kernels (``native_group_norm`` and its backward, so the results are
bit for bit ``nn.GroupNorm``'s at that thread count), with the backward run at a fixed
intra-op thread count, :data:`BACKWARD_THREADS` = 2, whatever the process's count: the split,
and with it every sum, is then the same at 1, 2 or 16 threads.  2 because the shipped U-Net
was made at 2 threads, so its weights stay the ones this module reproduces.  The cost is that
this one kernel uses 2 threads on a larger machine (it is a small part of a step).  CUDA
tensors, other dtypes and passes without gradients take ``nn.GroupNorm``'s own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.numerics import intra_op_threads

BACKWARD_THREADS = 2


class _GroupNormFixedSplit(torch.autograd.Function):
    """``native_group_norm`` forward; its backward at :data:`BACKWARD_THREADS` threads."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float) -> Tensor:
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.sizes = (n, c, hw, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with intra_op_threads(BACKWARD_THREADS):
            grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
                grad_y.contiguous(), x, mean, rstd, weight, *ctx.sizes, mask
            )
        return grad_x, grad_w, grad_b, None, None


class FixedSplitGroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (same parameters and state dict) whose CPU float32 backward
    runs at a fixed thread count (module docstring).  ``(B, C, *) -> (B, C, *)``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.is_grad_enabled() or x.dim() < 3:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return _GroupNormFixedSplit.apply(x.contiguous(), self.weight, self.bias, self.num_groups, self.eps)
