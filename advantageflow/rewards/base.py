"""The reward protocol, the reward registry and weighted composition.

A reward is a batched callable on decoded samples::

    reward(images, prompts, metadata) -> Tensor (B,)  |  dict[str, Tensor (B,)]

``images`` is what the policy's ``decode`` returns: ``(B, 3, H, W)`` in ``[0, 1]`` for image
models (``(B, 2)`` points for the 2-D task); video models' ``(B, F, 3, H, W)`` reach an image
reward frame by frame (:class:`CompositeReward`: mean over frames).  ``metadata`` is one dict
per sample (the prompt's structured spec, for verifiable rewards).  A reward may be
``async def``; it may set ``differentiable = True`` when its output keeps the autograd graph
of ``images`` (DRaFT needs this).  Rewards are found by registry name or dotted path (``pkg.module:factory``);
the factory is called with the config's ``args``.  A factory that sets ``builds_cheaply = True``
(no weights, no network) is built by ``advantageflow validate`` too, so that its constructor's
checks (e.g. the OCR reward's tesseract) fail there rather than at the start of training.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from advantageflow.registry import Registry, closest

REWARDS: Registry = Registry("reward")


@runtime_checkable
class RewardFn(Protocol):
    """A batched reward; see the module docstring."""

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Any: ...


class RewardError(RuntimeError):
    """A reward that failed or returned something unusable; training must not go on."""


@dataclass
class RewardResult:
    """Scores of one batch.

    Attributes:
        total: ``(B,)`` weighted sum of the components (what the advantages see when
            ``combine == "sum"``).
        components: named ``(B,)`` raw (unweighted) components.
        weights: the weight of each component.
    """

    total: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def is_differentiable(reward: Any) -> bool:
    """Whether ``reward`` declares that its scores carry gradients to the images."""
    return bool(getattr(reward, "differentiable", False))


def call_reward(reward: Any, images: Tensor, prompts: list[str], metadata: list[dict]) -> Any:
    """Call a sync or async reward and return its raw output."""
    out = reward(images, prompts, metadata)
    if inspect.isawaitable(out):
        out = _run_coroutine(out)
    return out


def _run_coroutine(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    raise RewardError("async rewards cannot be awaited from inside a running event loop")


def as_components(out: Any, name: str, batch: int) -> dict[str, Tensor]:
    """Check a reward's output: a ``(B,)`` tensor/list or a dict of them."""
    items = out.items() if isinstance(out, dict) else [(name, out)]
    result = {}
    for key, value in items:
        if not isinstance(value, Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                got = type(value).__name__
                raise RewardError(f"reward '{key}' returned {got}, expected ({batch},) numbers") from None
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
            raise RewardError(f"reward '{key}' returned {value.dtype} values, expected ({batch},) numbers")
        if value.dim() != 1 or value.shape[0] != batch:
            raise RewardError(
                f"reward '{key}' returned shape {tuple(value.shape)}, expected ({batch},)"
            )
        result[key] = value.float() if not value.is_floating_point() else value
    return result


def check_factory_args(factory: Any, args: dict) -> dict:
    """``args`` if ``factory(**args)`` binds: a ``ValueError`` names an unknown argument (with a
    suggestion) or a missing required one, before the factory runs (``validate`` runs it too)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return args
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [k for k, p in params.items() if p.kind in named]
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for key in args:
            if key not in valid:
                hint = closest(key, valid)
                more = f"; did you mean '{hint}'?" if hint else ""
                raise ValueError(f"unknown argument '{key}'{more} (valid: {valid})")
    missing = [k for k in valid if params[k].default is inspect.Parameter.empty and k not in args]
    if missing:
        raise ValueError(f"missing required argument(s) {missing} (give them under args:)")
    return args


def declared_differentiable(reward_or_factory: Any) -> bool | None:
    """What a built reward, or a reward class, declares (``differentiable``, default False);
    ``None`` for a factory function that declares nothing (known only once built)."""
    if hasattr(reward_or_factory, "differentiable"):
        return is_differentiable(reward_or_factory)
    return None if inspect.isroutine(reward_or_factory) else False


def check_reward_gradient(algo: str, algo_cls: Any, rewards: list[tuple[str, str, Any]]) -> None:
    """``ConfigError`` when ``algo_cls`` back-propagates through the reward
    (``requires_differentiable_reward``, e.g. DRaFT) and a reward is not differentiable.

    ``rewards``: ``(config key, reward name, the built reward or its factory)`` per term; the
    trainer checks the built rewards, ``validate`` (:func:`advantageflow.config.preflight`)
    their factories.
    """
    from advantageflow.configbase import ConfigError

    if not algo_cls.requires_differentiable_reward:
        return
    for where, name, reward in rewards:
        if declared_differentiable(reward) is False:
            raise ConfigError(
                f"'{where}': algo '{algo}' back-propagates through the reward, but reward '{name}' is not "
                "differentiable; choose one that declares differentiable = True (e.g. toy2d_smooth, pickscore)"
            )


def build_reward(name: str, args: dict | None = None) -> Any:
    """Instantiate the reward registered as ``name`` (or at a dotted path) with ``args``."""
    factory = REWARDS.get(name)
    return factory(**check_factory_args(factory, dict(args or {})))


def as_frames(videos: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, list[str], list[dict]]:
    """Videos ``(B, F, 3, H, W)`` as ``B F`` images ``(B F, 3, H, W)``, each with its video's
    prompt and metadata (video-major: video ``b``'s frames are rows ``b F .. b F + F - 1``)."""
    frames = videos.shape[1]
    return (
        videos.flatten(0, 1),
        [p for p in prompts for _ in range(frames)],
        [m for m in metadata for _ in range(frames)],
    )


class CompositeReward:
    """Weighted sum of named rewards; each component is kept for logging.

    ``reward(images, prompts, metadata) -> RewardResult``.  Differentiable only when every
    component is.  Videos ``(B, F, 3, H, W)`` (a video model's ``decode``): an image reward
    scores each frame with its video's prompt, and the video's score is the mean over its
    frames (so every frame counts equally and DRaFT's gradient reaches each); a reward that
    sets ``scores_video = True`` is given the videos whole.
    """

    def __init__(self, rewards: dict[str, Any], weights: dict[str, float]) -> None:
        if not rewards:
            raise ValueError("no reward configured: set reward.name or reward.components")
        self.rewards = rewards
        self.weights = weights
        self.differentiable = all(is_differentiable(r) for r in rewards.values())

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> RewardResult:
        batch = images.shape[0]
        components: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            per_frame = images.dim() == 5 and not getattr(reward, "scores_video", False)
            inputs = as_frames(images, prompts, metadata) if per_frame else (images, prompts, metadata)
            try:
                raw = call_reward(reward, *inputs)
            except RewardError:
                raise
            except Exception as err:  # noqa: BLE001 - a user's reward failing ends the run in one line
                first = (str(err).strip().splitlines() or [""])[0][:200]
                raise RewardError(f"reward '{name}' raised {type(err).__name__}: {first}") from err
            if per_frame:  # (B F,) frame scores -> (B,) video scores
                frames = images.shape[1]
                per = as_components(raw, name, batch * frames)
                out = {k: v.view(batch, frames).mean(dim=1) for k, v in per.items()}
            else:
                out = as_components(raw, name, batch)
            if len(out) > 1:
                # A reward returning named parts: "score" is the reward, the rest is logged.
                if "score" not in out:
                    raise RewardError(
                        f"reward '{name}' returned parts {sorted(out)}; one must be 'score'"
                    )
                for part, value in out.items():
                    if part != "score":
                        components[f"{name}/{part}"] = value
                out = {name: out["score"]}
            components[name] = next(iter(out.values()))
        total = sum(self.weights[n] * components[n].to(images.device) for n in self.rewards)
        return RewardResult(total=total, components=components, weights=dict(self.weights))
