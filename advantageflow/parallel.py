"""How the processes' gradients meet: DDP, FSDP2 or one flat all-reduce (``dist.strategy``).

The trainer weights each micro-batch loss by its share of the step's samples over *all*
processes, so the update equals the single-process one on the same global batch exactly when
the gradients are **summed** over processes.  Each strategy delivers that sum:

- :class:`AllReduce` -- no wrapper: gradients accumulate locally and one flat all-reduce sums
  them after the step's last micro-batch.  Works with any policy.
- :class:`DDP` -- ``DistributedDataParallel`` around the trained network (LoRA and small
  models): bucketed all-reduces overlap the backward.  DDP *averages*, so losses are scaled
  by the world size (:attr:`Strategy.loss_scale`).  A synced DDP backward all-reduces each
  parameter's *accumulated* ``.grad``, which averaging keeps right: micro-batches before the
  last run under ``no_sync`` (local sums), and each synced backward averages
  ``G + W g_r`` where ``G`` is already equal on every process.
- :class:`FSDP` -- FSDP2 ``fully_shard`` of the trained network (each block of its top-level
  ``ModuleList`` s, then the root) and of its frozen reference copy: parameters, gradients and
  optimizer state are sharded, for full fine-tuning of models that do not fit on one device.
  Every backward reduce-scatters (accumulated gradients stay sharded); FSDP2 averages too.

DDP's last synced backward and FSDP's per-forward all-gathers are collectives, so with them
every process runs the same number of micro-batches (:attr:`Strategy.lockstep`); a process
with fewer rows (zero-std groups filtered) pads with zero-weight repeats of one row.

With one process every strategy is the identity (:class:`Local`): the trainer's code path is
the same for 1 and N processes.  Checkpoints always hold whole (gathered) tensors, so they
move between world sizes and strategies.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from advantageflow.config import DistConfig
from advantageflow.configbase import ConfigError
from advantageflow.distributed import DistEnv, full_tensors, is_sharded, local_tensor, placed_like


class Strategy:
    """One process, nothing to synchronise; the base of the multi-process strategies.

    Attributes:
        lockstep: every process must run the same number of micro-batches per step.
        averages: the wrapper averages gradients over processes (DDP, FSDP2) where the trainer
            needs their sum.
        shards: parameters and optimizer state are sharded, so making them whole for a
            checkpoint takes every process.
    """

    name = "local"
    lockstep = False
    averages = False
    shards = False

    def __init__(self, env: DistEnv, cfg: DistConfig) -> None:
        self.env, self.cfg = env, cfg

    @property
    def loss_scale(self) -> float:
        """Factor on each micro-batch loss: the world size when the wrapper averages."""
        return float(self.env.world_size) if self.averages else 1.0

    def wrap(self, policy: Any) -> None:
        """Prepare ``policy`` (before its parameters are given to the optimizer or snapshot)."""

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for the backward passes of one micro-batch; ``last``: the step's last one."""
        return contextlib.nullcontext()

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Complete the gradients after the step's last micro-batch."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with whole tensors (every process must call this)."""
        return full_tensors(optimizer.state_dict())

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load :meth:`optimizer_state`'s output, sharding tensors like their parameters."""
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not is_sharded(p):
                    continue
                slot = optimizer.state.get(p, {})
                for key, value in slot.items():
                    if torch.is_tensor(value) and not is_sharded(value) and value.shape == p.shape:
                        slot[key] = placed_like(value, p)


Local = Strategy


class AllReduce(Strategy):
    """Gradients summed by one flat all-reduce after accumulation (any policy, no wrapper)."""

    name = "allreduce"

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        self.env.sum_gradients(params)


def _networks(policy: Any, strategy: str):
    nets = policy.networks()
    if nets is None:
        raise ConfigError(
            f"dist.strategy={strategy} wraps the policy's network, but {type(policy).__name__} has no "
            "networks (its networks() returns None); use dist.strategy=allreduce"
        )
    return nets


class DDP(Strategy):
    """``DistributedDataParallel`` over the trained network; see the module note."""

    name = "ddp"
    lockstep = averages = True
    module: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, policy: Any) -> None:
        nets = _networks(policy, self.name)
        device_ids = [self.env.device] if self.env.device.type == "cuda" else None
        # Buffers are not synchronised in forward: evaluation and rollouts run no-grad passes
        # whose number need not match a collective on every process.
        self.module = nn.parallel.DistributedDataParallel(
            nets.trained, device_ids=device_ids, broadcast_buffers=False,
            find_unused_parameters=self.cfg.find_unused_parameters,
        )
        policy.set_trained_forward(self.module)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()


class FSDP(Strategy):
    """FSDP2 ``fully_shard`` of the trained network and its frozen copy; see the module note."""

    name = "fsdp"
    lockstep = averages = shards = True

    def wrap(self, policy: Any) -> None:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise ConfigError(
                f"dist.strategy=fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}"
            ) from None
        nets = _networks(policy, self.name)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.cfg.fsdp_reshard_after_forward}
        if self.cfg.fsdp_param_dtype:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=getattr(torch, self.cfg.fsdp_param_dtype), reduce_dtype=torch.float32
            )
        for net in (nets.trained, nets.reference):
            if net is None:
                continue
            # Every process must shard the same weights (DDP checks this by broadcasting; FSDP2
            # does not): take process 0's, e.g. for a randomly initialised LoRA adapter.
            with torch.no_grad():
                for tensor in net.state_dict().values():
                    dist.broadcast(tensor, src=0)
            for block in shard_units(net):
                fully_shard(block, **options)
            fully_shard(net, **options)


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the elements of ``net``'s top-level ``ModuleList`` s
    (a DiT's or a diffusers transformer's blocks), so only one block's weights are whole at a
    time.  A network without any (a small MLP) is sharded as one unit."""
    return [block for child in net.children() if isinstance(child, nn.ModuleList) for block in child]


STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDP, "fsdp": FSDP, "allreduce": AllReduce}


def make_strategy(cfg: DistConfig, env: DistEnv) -> Strategy:
    """The strategy named by ``cfg.strategy`` (the identity with one process)."""
    if not env.active:
        return Local(env, cfg)
    return STRATEGIES[cfg.strategy](env, cfg)


def finite_gradients(params: list[nn.Parameter]) -> bool:
    """Whether this process's gradients (its shards, under FSDP) are all finite."""
    return all(p.grad is None or bool(torch.isfinite(local_tensor(p.grad)).all()) for p in params)
