"""Random draws keyed by what they belong to, never by the process or the micro-batch.

Every draw of a run comes from a generator seeded by a printable key (the run seed plus what
the draw is for), so a run is identical whether it is resumed or not, and whatever the number
of processes or the micro-batch size.  :class:`RowRandom` gives a loss one generator per
sample: row ``i``'s draws depend only on its own key, not on the rows it is batched with.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable key (stable across runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# The keys of a run's draws: the run seed, what the draw is for, and what it belongs to.  Built
# only here, so a key cannot be spelled two ways; changing one changes the run's numbers
# (tests/test_golden.py).


def prompts_key(seed: int, epoch: int) -> tuple:
    """The prompts epoch ``epoch`` samples."""
    return (seed, "prompts", epoch)


def sampler_key(seed: int, epoch: int) -> tuple:
    """The algorithm's per-epoch sampler draws (``sampler_request``'s generator)."""
    return (seed, "sampler", epoch)


def rollout_noise_key(seed: int, epoch: int, row: int) -> tuple:
    """The noise of the epoch's global sample ``row`` (initial and per-step draws)."""
    return (seed, "noise", epoch, row)


def eval_noise_key(seed: int, index: int) -> tuple:
    """The noise of evaluation sample ``index`` (the same at every evaluation of a run)."""
    return (seed, "eval", index)


def loss_step_key(seed: int, epoch: int, inner: int, step: int) -> tuple:
    """Draws shared by optimizer step ``step`` of inner epoch ``inner`` (``TrainContext.generator``)."""
    return (seed, "loss", epoch, inner, step)


def loss_row_key(seed: int, epoch: int, inner: int, row: int) -> tuple:
    """Per-sample loss draws of global sample ``row`` (``TrainContext.rows``).  Spelled like
    :func:`loss_step_key` (row ``k``'s key is step ``k``'s), as the golden numbers were made."""
    return (seed, "loss", epoch, inner, row)


class RowRandom:
    """Per-sample draws for a batch of ``B`` rows, each row from its own CPU generator.

    Row ``i``'s values are the same whether it is drawn alone, in a micro-batch of 16 or of
    64, on process 0 or 3: so splitting a step's batch over micro-batches and processes
    does not change the loss.  Each method returns ``(B, *shape)`` on the CPU.
    """

    def __init__(self, keys: list[Any]) -> None:
        self._gens = [seeded_generator(*k) if isinstance(k, tuple) else seeded_generator(k) for k in keys]

    @classmethod
    def from_generator(cls, generator: torch.Generator, rows: int) -> RowRandom:
        """``rows`` row generators seeded from one generator (for losses called outside the
        trainer, e.g. in tests)."""
        base = int(torch.randint(2**62, (1,), generator=generator))
        return cls([(base, i) for i in range(rows)])

    def __len__(self) -> int:
        return len(self._gens)

    def randn(self, *shape: int) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self._gens])

    def rand(self, *shape: int) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self._gens])

    def randint(self, high: int, *shape: int) -> Tensor:
        return torch.stack([torch.randint(high, shape, generator=g) for g in self._gens])

    def randperm(self, n: int) -> Tensor:
        """``(B, n)``: a permutation of ``range(n)`` per row."""
        return torch.stack([torch.randperm(n, generator=g) for g in self._gens])
