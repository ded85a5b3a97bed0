"""The optimizer the trainer steps: AdamW (Loshchilov & Hutter 2019) in full precision, or
its 8-bit form from bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"), whose two moments take 1 byte per parameter each instead of 4 — for a
full fine-tune of a multi-billion-parameter transformer the difference between fitting on
one GPU and not.  ``train.optimizer`` chooses; every other ``train.*`` setting means the
same for both.
"""

from __future__ import annotations

import math
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


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear
    warm-up over ``warmup`` steps, then a cosine from 1 down to ``final_ratio`` at step
    ``total`` (held after it); ``final_ratio = 1`` is a constant after the warm-up."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduled_lr(train, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run under ``train``
    (:class:`advantageflow.config.TrainConfig`): ``train.lr_schedule`` with its warm-up; the
    cosine reaches ``train.lr_final`` at the run's last step.  A pure function of the step,
    so a resumed run continues the schedule without any state of its own."""
    last = train.epochs * train.inner_epochs * train.steps_per_epoch - 1
    final_ratio = train.lr_final / train.lr if train.lr_schedule == "cosine" else 1.0
    return train.lr * lr_factor(step, train.lr_warmup_steps, last, final_ratio)
