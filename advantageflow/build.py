"""Turn a validated :class:`~advantageflow.config.Config` into live components."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from advantageflow.config import Config, RewardConfig
from advantageflow.configbase import ConfigError
from advantageflow.models import MODELS
from advantageflow.rewards import CompositeReward, build_reward
from advantageflow.tasks import TASKS


@dataclass
class Components:
    """Attributes: policy (FlowPolicy), task (Task), reward (CompositeReward)."""

    policy: Any
    task: Any
    reward: CompositeReward


def build_policy(cfg: Config, device: torch.device | str) -> Any:
    return MODELS.get(cfg.model.name).from_config(cfg.model, device=str(device))


def build_task(cfg: Config) -> Any:
    return TASKS.get(cfg.task.name)(cfg.task)


def build_reward_fn(cfg: RewardConfig) -> CompositeReward:
    terms = cfg.terms()
    if not terms:
        raise ConfigError("no reward configured: set reward.name (or reward.components)")
    rewards, weights = {}, {}
    for term in terms:
        key = term.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        if key in rewards:
            raise ConfigError(f"reward '{key}' appears twice in reward.components")
        try:
            rewards[key] = build_reward(term.name, term.args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"reward '{term.name}': {err}") from None
        weights[key] = term.weight
    return CompositeReward(rewards, weights)


def time_grid_for(policy: Any, steps: int, shift: float) -> torch.Tensor:
    """The policy's own sigma grid when it has one (diffusers schedulers), else ours."""
    from advantageflow.sampling import time_grid

    own = getattr(policy, "time_grid", None)
    return own(steps) if callable(own) else time_grid(steps, shift)


def build_components(cfg: Config, device: torch.device | str = "cpu") -> Components:
    # Cheap checks first: a bad prompt file or reward fails before a large model loads.
    task = build_task(cfg)
    reward = build_reward_fn(cfg.reward)
    return Components(policy=build_policy(cfg, device), task=task, reward=reward)
