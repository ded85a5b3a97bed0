"""Process-group plumbing: one code path for 1 or N processes (``torchrun``).

The trainer never branches on the world size: with one process every collective here is the
identity.  Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised with gloo
on CPU and NCCL on GPU.  How gradients meet (DDP, FSDP2, one flat all-reduce) is
:mod:`advantageflow.parallel`'s business; the tensor helpers at the end let the rest of the
code treat FSDP2's sharded parameters (``DTensor``) like plain tensors where it must.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistEnv:
    """Attributes: rank, world_size, local_rank, device; owns_group: this env initialised the
    process group (so :meth:`shutdown` destroys it; one made by someone else stays)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "cpu", timeout_s: float = 600.0) -> DistEnv:
        """Join the process group when launched by ``torchrun``; else a 1-process env."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=_resolve_device(device, 0))
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _resolve_device(device, local_rank)
        owns = not dist.is_initialized()
        if owns:
            _import_before_group_exists()
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
            )
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``(n, ...)`` tensor along dim 0, in rank order.

        Every rank must pass the same ``n``.
        """
        if not self.active:
            return tensor
        local = tensor.contiguous().to(self.device)  # NCCL only moves tensors on the GPU
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=0).to(tensor.device)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes, in place (returns ``tensor``)."""
        if self.active:
            self._all_reduce(tensor, dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, value: int) -> int:
        """The largest ``value`` over processes."""
        if not self.active:
            return value
        return int(self._all_reduce(torch.tensor([float(value)]), dist.ReduceOp.MAX).item())

    def _all_reduce(self, tensor: Tensor, op: Any) -> Tensor:
        local = tensor.to(self.device)
        dist.all_reduce(local, op=op)
        if local is not tensor:
            tensor.copy_(local)
        return tensor

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over ranks with one flat all-reduce (the trainer pre-scales each
        rank's loss)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = self._all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def shutdown(self) -> None:
        """Destroy the process group if :meth:`from_environment` initialised it.

        Destroying it must free it (joining gloo's worker threads) while the interpreter is
        alive: a gloo thread still alive at interpreter exit can release a tensor that needs
        the GIL and abort the process (SIGABRT, "terminate called without an active
        exception") after a run that finished.  See :func:`_import_before_group_exists`.
        """
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _import_before_group_exists() -> None:
    """Import the torch modules whose function defaults capture ``group.WORLD``.

    ``torch.distributed.nn.functional`` (imported by DDP) evaluates ``group.WORLD`` in its
    function defaults when first imported; imported after the process group exists, it
    pins that group for the life of the process, so ``destroy_process_group`` cannot free it
    and gloo's threads outlive the interpreter.  Imported before, the defaults hold ``None``.
    """
    import torch.distributed.nn.functional  # noqa: F401


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed tensors
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of a sharded tensor (a collective: every process must call it); other
    tensors are returned as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (no communication); else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def placed_like(value: Tensor, template: Tensor) -> Tensor:
    """A whole tensor ``value`` on ``template``'s device and dtype, sharded like it when it is
    sharded (every process holds the same ``value``, so each keeps its slice: no communication)."""
    value = full_tensor(value)
    if not is_sharded(template):
        return value.to(template.device, template.dtype)
    from torch.distributed.tensor import distribute_tensor

    local = value.to(template.to_local().device, template.dtype)
    return distribute_tensor(local, template.device_mesh, template.placements, src_data_rank=None)


def full_tensors(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every sharded tensor made whole, in a fixed
    traversal order (so the processes' collectives pair up)."""
    if is_sharded(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev
