"""Tiny policies for tests, written against the FlowPolicy protocol."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from advantageflow.models.base import PolicyBase
from advantageflow.models.toy import ToyMLPPolicy


class PerSamplePolicy(PolicyBase):
    """``v(x, t)[i] = P[i]``: a prediction linear in its parameters, one row per sample.

    Conditioning is the sample index ``(B,)`` so that micro-batches pick their rows.
    Counts calls to ``velocity`` (``calls``) and remembers the last inputs.
    """

    def __init__(self, batch: int, dim: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.param = nn.Parameter(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
        self.ref_param = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        self.sample_shape = (dim,)
        self.device = torch.device("cpu")
        self._use_ref = False
        self.calls = 0
        self.last_inputs: tuple[Tensor, Tensor] | None = None

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None, guidance_scale: float = 1.0) -> Tensor:
        self.calls += 1
        self.last_inputs = (x.detach(), t.detach())
        rows = cond if cond is not None else torch.arange(x.shape[0])
        return (self.ref_param if self._use_ref else self.param)[rows]

    def encode(self, prompts: list[str]) -> Any:
        return torch.arange(len(prompts))

    def decode(self, x: Tensor) -> Tensor:
        return x

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [("param", self.param)]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        self._use_ref = True
        try:
            yield
        finally:
            self._use_ref = False


def minimise_losses(algo, batch, policy: PerSamplePolicy, max_iter: int) -> None:
    """Run L-BFGS on ``policy.param`` until the algorithm's summed loss on ``batch`` is minimal
    (one fixed loss generator seed, so every evaluation draws the same times)."""
    import torch

    from advantageflow.algorithms.base import TrainContext

    opt = torch.optim.LBFGS([policy.param], max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        ctx = TrainContext(policy=policy, generator=torch.Generator().manual_seed(9), step=0)
        loss = sum(term.loss for term in algo.losses(batch, ctx))
        loss.backward()
        return loss

    opt.step(closure)


class DropoutVelocity(nn.Module):
    """A toy velocity network with dropout on its output; records ``(grad enabled, training)``
    of every forward pass in the class list ``MODES``."""

    MODES: list[tuple[bool, bool]] = []

    def __init__(self, inner: nn.Module, p: float) -> None:
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(p)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        DropoutVelocity.MODES.append((torch.is_grad_enabled(), self.training))
        return self.drop(self.inner(x, t))


class DropoutToyPolicy(ToyMLPPolicy):
    """The toy 2-D policy with dropout ``p`` on its velocity (same base weights as ``toy_mlp``)."""

    @dataclass
    class Config(ToyMLPPolicy.Config):
        name: str = "tests.policies:DropoutToyPolicy"
        dropout: float = 0.5

    @classmethod
    def from_config(cls, cfg: Config, device: str = "cpu") -> DropoutToyPolicy:
        base = {f.name: getattr(cfg, f.name) for f in fields(ToyMLPPolicy.Config) if f.name != "name"}
        toy = ToyMLPPolicy.from_config(ToyMLPPolicy.Config(**base), device)  # shares the toy's cache
        return cls(DropoutVelocity(toy.net, cfg.dropout), device)
