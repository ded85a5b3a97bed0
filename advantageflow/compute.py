"""Machine-independent training cost: network rows and FLOPs, counted where the policy calls its
denoising network.

Wall-clock seconds depend on the machine and on how loaded it was; the number of batch rows that
went through the denoising network does not.  :class:`ComputeMeter` puts forward hooks on the
policy's networks (``policy.networks()``: the trained network and, for full fine-tuning, its
frozen reference copy), so every pass is counted whoever makes it -- rollouts, the old / EMA
policy (the same network with swapped parameters), the reference (LoRA adapter off, or the
frozen copy), classifier-free guidance (the doubled batch is what reaches the network) and
evaluation -- without any per-model code.

Counters (cumulative, summed over processes by :func:`collect`):

- ``perf/network_rows_fwd``: rows through a network outside evaluation (rollouts + training).
- ``perf/network_rows_bwd``: rows whose forward output received a gradient (one count per
  backward pass through that output).
- ``perf/flops``: forward + backward FLOPs of those rows (:data:`BACKWARD_FACTOR`).
- ``perf/eval_network_rows_fwd``, ``perf/eval_flops``: the same for held-out evaluation, kept
  apart so that compute-to-target compares training compute only (evaluation is measurement:
  its cost depends on ``eval.every``, not on the algorithm).

FLOPs are those of ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions,
attention; element-wise operations are not counted).  Measuring on every call is slow, so the
forward FLOPs per row are measured once per (network, per-row input shapes, grad mode, adapter
state), on the live call itself (no extra pass, so no extra collective under FSDP), and
multiplied by the row counts.  Backward FLOPs are :data:`BACKWARD_FACTOR` times the forward
FLOPs of the same rows: exact for linear layers whose input and weight gradients are both
computed (``dL/dX = dL/dY W`` and ``dL/dW = X^T dL/dY`` each cost a forward's product), the
convention of Kaplan et al. 2020, "Scaling laws for neural language models" (``C ~ 6N`` per
token) -- less the forward FLOPs of layers whose weights are frozen (a LoRA adapter's base
layers, or what ``model.train_only`` leaves out), which compute the input gradient only.  It
over-counts by the input gradients that autograd skips: the first layer's when the network's
input needs none, and those of frozen layers below every trained one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

FWD = "perf/network_rows_fwd"
BWD = "perf/network_rows_bwd"
FLOPS = "perf/flops"
EVAL_FWD = "perf/eval_network_rows_fwd"
EVAL_FLOPS = "perf/eval_flops"
KEYS = (FWD, BWD, FLOPS, EVAL_FWD, EVAL_FLOPS)
ROW_KEYS = (FWD, BWD, EVAL_FWD)

#: backward FLOPs per forward FLOP (see the module note).
BACKWARD_FACTOR = 2.0


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _output_tensor(output: Any) -> Tensor | None:
    """The network's prediction: the output, or the first tensor of a tuple / list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


def _adapter_switch(net: nn.Module) -> Any:
    """A layer whose ``disable_adapters`` flag says whether a LoRA adapter is off (peft), so
    the adapter's FLOPs are measured apart from the bare network's; ``None`` without adapters."""
    return next((m for m in net.modules() if isinstance(getattr(m, "disable_adapters", None), bool)), None)


class _FrozenLayerTally:
    """While one call of ``net`` is measured: the forward FLOPs, in the counter ``mode``, of its
    leaf layers whose parameters are all frozen (their backward computes the input gradient
    only).  Hooks on those layers read the counter's total before and after each of them."""

    def __init__(self, net: nn.Module, mode: Any) -> None:
        self.flops = 0.0
        self._mode, self._start = mode, 0.0
        frozen = [m for m in net.modules()
                  if next(m.children(), None) is None and (ps := list(m.parameters(recurse=False)))
                  and not any(p.requires_grad for p in ps)]
        self._handles = [h for m in frozen for h in (m.register_forward_pre_hook(self._enter),
                                                     m.register_forward_hook(self._leave))]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._start = self._mode.get_total_flops()

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.flops += self._mode.get_total_flops() - self._start

    def close(self) -> float:
        for handle in self._handles:
            handle.remove()
        return self.flops


class ComputeMeter:
    """Counts rows (and FLOPs) through ``networks``; see the module note.

    The network's first tensor argument must be batch-first: its leading size is the number of
    rows of the call.

    Attributes:
        phase: ``"train"`` or ``"eval"`` (see :meth:`evaluating`): which counters a pass adds to.
        flops_per_row: forward FLOPs per row measured so far, by call signature.
        backward_flops_per_row: backward FLOPs per row of the same signatures (see the module
            note: twice the forward, less the frozen layers' weight-gradient share).
    """

    def __init__(self, networks: Sequence[nn.Module], measure_flops: bool = True) -> None:
        self.phase = "train"
        self.measure_flops = measure_flops
        self.flops_per_row: dict[tuple, float] = {}
        self.backward_flops_per_row: dict[tuple, float] = {}
        self._counts = dict.fromkeys(KEYS, 0.0)
        # id(net) -> a stack of its calls in progress:
        # (signature, rows, FlopCounterMode or None, _FrozenLayerTally or None)
        self._calls: dict[int, list[tuple[tuple | None, int, Any, Any]]] = {}
        self._handles = []
        self._switches: dict[int, Any] = {}
        unique = list({id(n): n for n in networks}.values())
        for net in unique:
            self._switches[id(net)] = _adapter_switch(net)
            self._handles.append(net.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(net.register_forward_hook(self._after, with_kwargs=True, always_call=True))
        self.active = bool(unique)

    @classmethod
    def for_policy(cls, policy: Any, measure_flops: bool = True) -> ComputeMeter:
        """A meter on ``policy.networks()``; one that counts nothing (``active`` false) for a
        policy without networks."""
        nets = policy.networks()
        if nets is None:
            return cls([], measure_flops)
        return cls([n for n in (nets.trained, nets.reference) if n is not None], measure_flops)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Passes in this context count as evaluation (``perf/eval_*``)."""
        previous, self.phase = self.phase, "eval"
        try:
            yield
        finally:
            self.phase = previous

    # ------------------------------------------------------------------ hooks

    def _key(self, net: nn.Module, args: tuple, kwargs: dict, rows: int) -> tuple:
        """Call signature: per-row shapes of batch-first tensors (leading size ``rows`` -> -1),
        whole shapes of the others, grad mode and adapter state."""
        shapes = []
        for name, value in (*enumerate(args), *kwargs.items()):
            if isinstance(value, Tensor):
                shape = tuple(value.shape)
                shapes.append((name, (-1, *shape[1:]) if shape and shape[0] == rows else shape))
        switch = self._switches[id(net)]
        adapters_off = None if switch is None else bool(switch.disable_adapters)
        return (id(net), tuple(shapes), torch.is_grad_enabled(), adapters_off)

    def _before(self, net: nn.Module, args: tuple, kwargs: dict) -> None:
        first = _first_tensor(args, kwargs)
        if first is None or first.dim() == 0:
            return
        rows = int(first.shape[0])
        key = self._key(net, args, kwargs, rows) if self.measure_flops else None
        mode = tally = None
        if key is not None and key not in self.flops_per_row and rows > 0 and not self._measuring(net):
            from torch.utils.flop_counter import FlopCounterMode

            mode = FlopCounterMode(display=False)
            mode.__enter__()
            tally = _FrozenLayerTally(net, mode)
        self._calls.setdefault(id(net), []).append((key, rows, mode, tally))

    def _measuring(self, net: nn.Module) -> bool:
        return any(mode is not None for _, _, mode, _ in self._calls.get(id(net), []))

    def _after(self, net: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = self._calls.get(id(net))
        if not stack:  # an earlier pre-hook raised before ours ran
            return
        key, rows, mode, tally = stack.pop()
        if mode is not None:
            mode.__exit__(None, None, None)
            frozen = tally.close()
            if output is not None:  # None: the forward raised; measure again next time
                total = mode.get_total_flops()
                self.flops_per_row[key] = total / rows
                self.backward_flops_per_row[key] = (BACKWARD_FACTOR * total - frozen) / rows
        out = _output_tensor(output)
        if out is None:
            return
        per_row = self.flops_per_row.get(key) if key is not None else None
        fwd_flops = rows * per_row if per_row is not None else 0.0
        if self.phase == "eval":
            self._counts[EVAL_FWD] += rows
            self._counts[EVAL_FLOPS] += fwd_flops
            return
        self._counts[FWD] += rows
        self._counts[FLOPS] += fwd_flops
        if torch.is_grad_enabled() and out.requires_grad:
            bwd_per_row = self.backward_flops_per_row.get(key) if key is not None else None
            out.register_hook(self._backward_counter(rows, rows * bwd_per_row if bwd_per_row is not None else 0.0))

    def _backward_counter(self, rows: int, flops: float):
        def count(grad: Tensor) -> None:
            self._counts[BWD] += rows
            self._counts[FLOPS] += flops

        return count

    # ------------------------------------------------------------------ reading

    @property
    def flops_supported(self) -> bool:
        """FLOPs were measured and every measured signature has some (a network whose
        operations the FLOP counter does not know reports none, and ``perf/flops`` is left out)."""
        return self.measure_flops and bool(self.flops_per_row) and all(v > 0 for v in self.flops_per_row.values())

    def take(self) -> dict[str, float]:
        """This process's counts since the last call (every key of :data:`KEYS`), then zero them."""
        out, self._counts = self._counts, dict.fromkeys(KEYS, 0.0)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def collect(meter: ComputeMeter, env: Any, totals: dict[str, float]) -> dict[str, float]:
    """Add every process's counts since the last call to ``totals`` (the run's cumulative
    counters, saved in checkpoints) and return the metrics to log.

    Every process must call this (one all-reduce).  FLOP keys are left out when the model's
    FLOPs cannot be counted (:attr:`ComputeMeter.flops_supported`).
    """
    if not meter.active:
        return {}
    local = meter.take()
    summed = env.all_reduce_sum(torch.tensor([local[k] for k in KEYS], dtype=torch.float64))
    for key, value in zip(KEYS, summed.tolist()):
        totals[key] = totals.get(key, 0.0) + value
    shown = KEYS if meter.flops_supported else ROW_KEYS
    return {k: int(totals[k]) if k in ROW_KEYS else float(totals[k]) for k in shown}
