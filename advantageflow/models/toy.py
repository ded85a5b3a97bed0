"""A small MLP velocity field for 2-D data, with a frozen-copy reference.

Used by the 2-D task and the tests: it trains in seconds on a CPU.  The base model is
pretrained in-process by plain flow matching on the task's data and cached on disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advantageflow.models.base import FrozenCopyPolicy
from advantageflow.toydata import DATASETS


def time_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features ``(B, dim)`` of times ``t`` ``(B,)`` in ``[0, 1]``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(1000.0) / half))
    angles = (100.0 * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(t.dtype)


class VelocityMLP(nn.Module):
    """``v(x, t)``: ``(B, D), (B,) -> (B, D)``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, time_features(t, self.time_dim).to(x.dtype)], dim=1))


def pretrain_flow_matching(
    net: nn.Module,
    data_fn: Any,
    steps: int,
    batch: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Plain conditional flow matching ``||v(x_t, t) - (eps - x0)||^2``; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0 = data_fn(batch, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(batch, generator=gen)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = ((net(x_t, t) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


class ToyMLPPolicy(FrozenCopyPolicy):
    """Unconditional 2-D flow policy: conditioning is ``None``; ``decode`` is the identity."""

    @dataclass
    class Config:
        """Attributes:
        data: the pretraining distribution (see :mod:`advantageflow.toydata`).
        hidden, depth: MLP size.  pretrain_steps: flow-matching steps for the base model.
        cache_dir: where the pretrained base model is cached ('' disables the cache).
        """

        name: str = "toy_mlp"
        data: Literal["gmm8"] = "gmm8"
        hidden: int = 128
        depth: int = 3
        pretrain_steps: int = 3000
        pretrain_seed: int = 0
        cache_dir: str = "~/.cache/advantageflow"

    sample_shape = (2,)

    def __init__(self, net: VelocityMLP, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.ref_net = copy.deepcopy(self.net).requires_grad_(False).eval()
        self._active = self.net

    @classmethod
    def from_config(cls, cfg: Config, device: str = "cpu") -> ToyMLPPolicy:
        net = VelocityMLP(2, cfg.hidden, cfg.depth)
        key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
        cache = Path(os.path.expanduser(cfg.cache_dir)) / f"toy_mlp-{key}.pt" if cfg.cache_dir else None
        if cache is not None and cache.exists():
            net.load_state_dict(torch.load(cache, weights_only=True))
        else:
            torch.manual_seed(cfg.pretrain_seed)
            net = VelocityMLP(2, cfg.hidden, cfg.depth)
            pretrain_flow_matching(net, DATASETS[cfg.data], cfg.pretrain_steps, seed=cfg.pretrain_seed)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".tmp{os.getpid()}")
                torch.save(net.state_dict(), tmp)
                os.replace(tmp, cache)
        return cls(net, device)

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None, guidance_scale: float = 1.0) -> Tensor:
        return self._active(x, t)

    def encode(self, prompts: list[str]) -> Any:
        return None

    def decode(self, x: Tensor) -> Tensor:
        return x

