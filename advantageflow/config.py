"""The run configuration: one typed tree, read from YAML plus ``key=value`` overrides.

The algorithm is chosen by ``algo:`` and its options live in a section named after it::

    algo: advantageflow
    advantageflow:
      gamma: 1.1

``model:`` and ``task:`` are tagged by their ``name`` key, which picks their typed options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from advantageflow.configbase import (
    ConfigError,
    apply_override,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
    union_field,
)
from advantageflow.registry import RegistryError, closest


def _model_config(name: str) -> type:
    from advantageflow.models import MODELS

    return MODELS.get(name).Config


def _task_config(name: str) -> type:
    from advantageflow.tasks import TASKS

    return TASKS.get(name).Config


@dataclass
class SamplerConfig:
    """How rollouts and evaluation samples are drawn (algorithms may ask for more).

    ``solver`` integrates the ODE for rollouts of forward-process methods; Flow-GRPO and
    DRaFT ask the sampler for an SDE or a kept trajectory through their own settings.
    ``sa_solver`` is the stochastic SA-Solver (:func:`advantageflow.sampling.sa_solver_sample`)
    with AWM's released stochasticity (``tau = 0.4`` for target times in ``[0.3, 0.9]``).
    """

    steps: int = 10
    eval_steps: int = 20
    shift: float = 1.0
    solver: Literal["euler", "heun", "dpmpp_2m", "sa_solver"] = "euler"
    eval_solver: Literal["euler", "heun", "dpmpp_2m", "sa_solver"] = "euler"
    guidance_scale: float = 1.0
    batch_size: int = 256

    def validate(self) -> None:
        if self.steps < 1 or self.eval_steps < 1:
            raise ConfigError("sampler.steps and sampler.eval_steps must be >= 1")
        if self.shift <= 0:
            raise ConfigError("sampler.shift must be > 0")


@dataclass
class AdvantageConfig:
    """Group-relative advantages (docs/algorithms/README.md, 'Advantages')."""

    std: Literal["global", "group", "none"] = "global"
    clip: float = 5.0
    eps: float = 1e-4


@dataclass
class RewardTerm:
    """One named reward in a weighted sum."""

    name: str = ""
    weight: float = 1.0
    args: dict = field(default_factory=dict)


@dataclass
class RewardConfig:
    """A single reward (``name`` + ``args``) or a weighted sum of ``components``.

    ``combine``: ``sum`` adds the weighted raw rewards before the advantage normalisation
    (the authors' code); ``per_reward`` normalises each component's advantage first.
    ``async_scoring``: score each sampling chunk in a background thread while the next chunk
    is sampled (``sampler.batch_size`` sets the chunk); results are identical.
    """

    name: str = "shapes_eval"
    args: dict = field(default_factory=dict)
    components: list[RewardTerm] = field(default_factory=list)
    combine: Literal["sum", "per_reward"] = "sum"
    async_scoring: bool = False

    def validate(self) -> None:
        if self.name and self.components:
            raise ConfigError("give either reward.name or reward.components, not both (set reward.name to '')")

    def terms(self) -> list[RewardTerm]:
        return self.components or ([RewardTerm(self.name, 1.0, self.args)] if self.name else [])


@dataclass
class TrainConfig:
    """The outer loop: rollouts per epoch, optimizer steps, and the optimizer.

    Budgets (0 = none) end the run at the end of the epoch that reaches them, as if it had
    reached ``epochs`` (final evaluation, checkpoint, summary with ``stopped_by``):
    ``max_samples`` counts rollout samples, ``max_wall_s`` training seconds (rollouts, rewards
    and updates; evaluation, checkpoints and start-up are not counted), both summed over a
    resumed run's parts.
    """

    epochs: int = 80
    prompts_per_epoch: int = 16
    group_size: int = 8
    steps_per_epoch: int = 2
    inner_epochs: int = 1
    micro_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    max_wall_s: float = 0.0
    max_samples: int = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.prompts_per_epoch * self.group_size

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError("train.group_size must be >= 2 (advantages compare samples of a group)")
        for key in ("epochs", "prompts_per_epoch", "steps_per_epoch", "inner_epochs", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1")
        if self.samples_per_epoch % self.steps_per_epoch:
            raise ConfigError(
                f"train.steps_per_epoch ({self.steps_per_epoch}) must divide the samples per epoch "
                f"(prompts_per_epoch * group_size = {self.samples_per_epoch})"
            )
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        for key in ("max_wall_s", "max_samples"):
            if not getattr(self, key) >= 0:  # also refuses NaN
                raise ConfigError(f"train.{key} must be >= 0 (0 = no budget)")


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts with the evaluation sampler.

    ``ema_decay``: evaluate an exponential moving average of the weights instead of the
    weights themselves (0 = off; Flow-GRPO and DiffusionNFT use 0.9, AWM 0.99): see
    :class:`advantageflow.evaluation.WeightsEMA`.  Kept in checkpoints.
    """

    every: int = 20
    num_prompts: int = 96
    samples_per_prompt: int = 9
    ema_decay: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("eval.ema_decay must be in [0, 1) (0 turns the evaluation EMA off)")


@dataclass
class CheckpointConfig:
    every: int = 10
    keep: int = 2


@dataclass
class LogConfig:
    """``flops``: measure FLOPs per network row (``perf/flops``, :mod:`advantageflow.compute`);
    network rows are counted either way."""

    tensorboard: bool = True
    progress: bool = True
    image_every: int = 0
    flops: bool = True


@dataclass
class DistConfig:
    """Many processes (``torchrun``); with one process every setting here is inert.

    ``strategy``: how gradients meet (:mod:`advantageflow.parallel`):

    - ``ddp``: DistributedDataParallel over the trained network (LoRA and small models);
      bucketed all-reduce overlapped with the backward of each step's last micro-batch.
    - ``fsdp``: FSDP2 ``fully_shard`` of the trained network (per block, then the root) and
      of its frozen reference copy: full fine-tuning of models too large for one device.
    - ``allreduce``: no wrapper; one flat all-reduce after accumulation (any policy).

    ``timeout_s``: how long a process waits for the others in a collective before the run ends
    with an error.  ``find_unused_parameters``: DDP's option, for networks whose forward skips
    some trained parameters.  ``fsdp_reshard_after_forward``: free gathered weights after each
    forward (less memory, one more all-gather in backward).  ``fsdp_param_dtype``: FSDP2 mixed
    precision (``bfloat16`` on GPU: compute in bf16, gradients reduced in float32); '' = off.
    """

    strategy: Literal["ddp", "fsdp", "allreduce"] = "ddp"
    timeout_s: float = 600.0
    find_unused_parameters: bool = False
    fsdp_reshard_after_forward: bool = True
    fsdp_param_dtype: Literal["", "bfloat16", "float16", "float32"] = ""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("dist.timeout_s must be > 0")


ALGO_KEYS = ("algo",)


@dataclass
class Config:
    """Everything a run needs.  ``algorithm`` holds the typed section of ``algo``.

    The defaults are the main job (``configs/shapes_advantageflow.yaml``): AdvantageFlow on
    ShapesEval from the shipped small DiT.

    ``device``: ``cpu``, ``cuda``, ``auto``.  ``dist``: multi-process settings.
    """

    seed: int = 0
    device: str = "cpu"
    algo: str = "advantageflow"
    algorithm: Any = None
    model: Any = union_field(_model_config, "shapes_dit")
    task: Any = union_field(_task_config, "shapes")
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        """Plain dict in the YAML layout (the algorithm's section under its own name)."""
        data = to_dict(self)
        data[self.algo] = data.pop("algorithm")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def build_config(data: dict) -> Config:
    """Validate a raw mapping into a :class:`Config`."""
    from advantageflow.algorithms import ALGORITHMS

    data = dict(data)
    algo = data.get("algo", Config.algo)
    if not isinstance(algo, str):
        raise ConfigError(f"'algo' must be a string, got {algo!r}")
    try:
        algo_cls = ALGORITHMS.get(algo)
    except RegistryError as err:
        raise ConfigError(f"'algo': {err}") from None
    # A user's algorithm given by dotted path may keep its options under its short name.
    short = algo.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    section = data.pop(algo, None) or (data.pop(short, None) if short != algo else None) or {}
    if "algorithm" in data:
        raise ConfigError(f"put the algorithm's options under '{algo}:', not 'algorithm:'")
    for other in ALGORITHMS.names():
        if other in data:
            raise ConfigError(
                f"config has a section '{other}' but algo is '{algo}'; rename it to '{algo}' "
                f"or set algo: {other}"
            )
    cfg = from_dict(Config, data)
    cfg.algorithm = from_dict(algo_cls.Config, section, algo)
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or the defaults when ``None``), apply ``key=value`` overrides, validate."""
    data = load_yaml(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys == ["algo"] and isinstance(value, str) and data.get("algo") not in (None, value):
            # Switching algorithm from the command line drops the old section.
            data.pop(data.get("algo"), None)
        apply_override(data, keys, value)
    return build_config(data)


__all__ = [
    "AdvantageConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DistConfig",
    "EvalConfig",
    "LogConfig",
    "RewardConfig",
    "RewardTerm",
    "SamplerConfig",
    "TrainConfig",
    "build_config",
    "closest",
    "load_config",
]
