"""Turn a validated :class:`~advantageflow.config.Config` into live components."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from advantageflow.config import Config, RewardConfig, RewardTerm, reward_keys
from advantageflow.configbase import ConfigError
from advantageflow.models import MODELS
from advantageflow.rewards import CompositeReward, RewardError, build_reward
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


def build_reward_term(term: RewardTerm, where: str = "reward") -> Any:
    """One reward of the config (``where``: ``reward`` or ``reward.components[i]``), with a
    one-line ``ConfigError`` naming its ``args`` if its factory refuses them or the environment
    (e.g. no tesseract for ``ocr``)."""
    try:
        return build_reward(term.name, term.args)
    except (TypeError, ValueError, RewardError) as err:
        raise ConfigError(f"'{where}.args': reward '{term.name}': {err}") from None


def build_reward_fn(cfg: RewardConfig) -> CompositeReward:
    terms = cfg.terms()
    if not terms:
        raise ConfigError("no reward configured: set reward.name (or reward.components)")
    rewards, weights = {}, {}
    for term, where in zip(terms, reward_keys(cfg)):
        key = term.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        if key in rewards:
            raise ConfigError(f"reward '{key}' appears twice in reward.components")
        rewards[key] = build_reward_term(term, where.removesuffix(".name"))
        weights[key] = term.weight
    return CompositeReward(rewards, weights)


def build_components(cfg: Config, device: torch.device | str = "cpu") -> Components:
    # Cheap checks first: a bad prompt file or reward fails before a large model loads.
    task = build_task(cfg)
    reward = build_reward_fn(cfg.reward)
    return Components(policy=build_policy(cfg, device), task=task, reward=reward)
