"""The optimizer the trainer steps: AdamW (Loshchilov & Hutter 2019) in full precision, or
its 8-bit form from bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"), whose two moments take 1 byte per parameter each instead of 4 — for a
full fine-tune of a multi-billion-parameter transformer the difference between fitting on
one GPU and not.  ``train.optimizer`` chooses; every other ``train.*`` setting means the
same for both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from advantageflow.configbase import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")


def build_optimizer(params: Iterable[torch.nn.Parameter], train) -> torch.optim.Optimizer:
    """The ``train.optimizer`` over ``params`` with ``train``'s lr, weight decay, betas, eps."""
    kwargs = dict(lr=train.lr, weight_decay=train.weight_decay, betas=tuple(train.adam_betas), eps=train.adam_eps)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{train.optimizer}'")
