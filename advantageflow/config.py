"""The run configuration: one typed tree, read from YAML plus ``key=value`` overrides.

The algorithm is chosen by ``algo:`` and its options live in a section named after it::

    algo: advantageflow
    advantageflow:
      gamma: 1.1

``model:`` and ``task:`` are tagged by their ``name`` key, which picks their typed options.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
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
    from advantageflow.models import MODELS, PolicyBase

    return _declared(MODELS.get(name), PolicyBase, name, "a model").Config


def _task_config(name: str) -> type:
    from advantageflow.tasks import TASKS, TaskBase

    return _declared(TASKS.get(name), TaskBase, name, "a task").Config


def _declared(entry: Any, base: type, name: str, what: str) -> type:
    """``entry`` if it is a subclass of ``base`` (which gives the members the trainer calls
    their defaults) with a ``Config`` dataclass; a ``RegistryError`` naming ``base`` else."""
    if not (isinstance(entry, type) and issubclass(entry, base)
            and dataclasses.is_dataclass(getattr(entry, "Config", None))):
        raise RegistryError(
            f"'{name}' is not {what} (a subclass of {base.__module__}.{base.__name__} with a Config dataclass)"
        )
    return entry


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
        at_least(self, "sampler", guidance_scale=0.0, batch_size=1)


@dataclass
class AdvantageConfig:
    """Group-relative advantages (docs/algorithms/README.md, 'Advantages').

    ``clip``: the advantages are clipped to ``[-clip, clip]``, once, by the trainer.  Unset
    (``null``), it is the algorithm's own clip (``adv_clip`` of AdvantageFlow, Flow-GRPO, AWM and
    DiffusionNFT, whose losses also divide by it), else 5; set, it must equal that ``adv_clip``
    (:func:`advantage_clip`).
    """

    std: Literal["global", "group", "none"] = "global"
    clip: float | None = None
    eps: float = 1e-4

    def validate(self) -> None:
        # eps < 0 would flip the sign of advantages of groups with spread below |eps|.
        above(self, "advantage", eps=0.0)
        if self.clip is not None:
            above(self, "advantage", clip=0.0)


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

    Learning-rate schedule (per optimizer step, :func:`advantageflow.optim.scheduled_lr`): a
    linear warm-up over ``lr_warmup_steps`` steps, then ``lr`` held (``constant``) or a cosine
    from ``lr`` down to ``lr_final`` at the run's last step (``cosine``; the last step is
    ``epochs * inner_epochs * steps_per_epoch``, so raising ``epochs`` stretches it).

    Budgets (0 = none) end the run at the end of the epoch that reaches them, as if it had
    reached ``epochs`` (final evaluation, checkpoint, summary with ``stopped_by``):
    ``max_samples`` counts rollout samples, ``max_wall_s`` training seconds (rollouts, rewards
    and updates; evaluation, checkpoints and start-up are not counted), both summed over a
    resumed run's parts.
    """

    epochs: int = 36
    prompts_per_epoch: int = 16
    group_size: int = 8
    steps_per_epoch: int = 1
    inner_epochs: int = 1
    micro_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' 8-bit moments
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    max_wall_s: float = 0.0
    max_samples: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    lr_final: float = 0.0

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
        if self.lr_warmup_steps < 0:
            raise ConfigError("train.lr_warmup_steps must be >= 0")
        if self.lr_schedule == "cosine" and not 0.0 <= self.lr_final <= self.lr:
            raise ConfigError(f"train.lr_final must be in [0, train.lr = {self.lr}], got {self.lr_final}")
        if self.lr_schedule == "constant" and self.lr_final != 0.0:
            raise ConfigError("train.lr_final is the end of the cosine: set train.lr_schedule=cosine or leave it at 0")
        for key in ("max_wall_s", "max_samples"):
            if not getattr(self, key) >= 0:  # also refuses NaN
                raise ConfigError(f"train.{key} must be >= 0 (0 = no budget)")
        at_least(self, "train", weight_decay=0.0, grad_clip=0.0, max_bad_steps=1)
        above(self, "train", adam_eps=0.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts with the evaluation sampler.

    ``ema_decay``: evaluate an exponential moving average of the weights instead of the
    weights themselves (0 = off; Flow-GRPO and DiffusionNFT use 0.9, AWM 0.99): see
    :class:`advantageflow.evaluation.WeightsEMA`.  Kept in checkpoints.
    """

    every: int = 12
    num_prompts: int = 96
    samples_per_prompt: int = 9
    ema_decay: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("eval.ema_decay must be in [0, 1) (0 turns the evaluation EMA off)")
        at_least(self, "eval", every=0, num_prompts=1, samples_per_prompt=1)


@dataclass
class CheckpointConfig:
    """``every``: epochs between checkpoints; ``keep``: intact checkpoints kept (>= 1)."""

    every: int = 10
    keep: int = 2

    def validate(self) -> None:
        at_least(self, "checkpoint", every=1, keep=1)


@dataclass
class LogConfig:
    """``flops``: measure FLOPs per network row (``perf/flops``, :mod:`advantageflow.compute`);
    network rows are counted either way.

    ``image_every``: every that many epochs (0 = never) a grid of the epoch's rollout samples,
    ``image_prompts`` prompts x ``image_samples`` samples labelled with prompt and reward, goes
    to ``RUN/images/epoch_EEEE.png``, TensorBoard and W&B (:mod:`advantageflow.imagelog`).
    ``wandb``: also log to Weights & Biases (project ``wandb_project``; ``WANDB_MODE=offline``
    works without an account)."""

    tensorboard: bool = True
    progress: bool = True
    image_every: int = 0
    image_prompts: int = 4
    image_samples: int = 4
    flops: bool = True
    wandb: bool = False
    wandb_project: str = "advantageflow"

    def validate(self) -> None:
        at_least(self, "log", image_every=0, image_prompts=1, image_samples=1)
        if self.wandb and not self.wandb_project:
            raise ConfigError("log.wandb_project must name a W&B project")


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


DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


def at_least(section: Any, prefix: str, **bounds: float) -> None:
    """``ConfigError`` naming the key unless every ``section.key >= bound``."""
    for key, low in bounds.items():
        value = getattr(section, key)
        if not value >= low:  # also false for NaN
            raise ConfigError(f"{prefix}.{key} must be >= {low}, got {value}")


def above(section: Any, prefix: str, **bounds: float) -> None:
    """``ConfigError`` naming the key unless every ``section.key > bound``."""
    for key, low in bounds.items():
        value = getattr(section, key)
        if not value > low:
            raise ConfigError(f"{prefix}.{key} must be > {low}, got {value}")


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

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if not DEVICE_RE.match(self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N, mps or auto, got '{self.device}'")
        if self.train.optimizer == "adamw8bit" and self.dist.strategy == "fsdp":
            raise ConfigError("train.optimizer=adamw8bit cannot step FSDP2's sharded (DTensor) parameters; "
                              "use dist.strategy=ddp or train.optimizer=adamw")

    def to_dict(self) -> dict:
        """Plain dict in the YAML layout (the algorithm's section under its own name), with the
        advantage clip the run uses written out (:func:`advantage_clip`)."""
        data = to_dict(self)
        data[self.algo] = data.pop("algorithm")
        data["advantage"]["clip"] = advantage_clip(self)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def build_config(data: dict) -> Config:
    """Validate a raw mapping into a :class:`Config`."""
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.algorithms.base import AlgorithmBase

    data = dict(data)
    algo = data.get("algo", Config.algo)
    if not isinstance(algo, str):
        raise ConfigError(f"'algo' must be a string, got {algo!r}")
    try:
        algo_cls = ALGORITHMS.get(algo)
    except RegistryError as err:
        raise ConfigError(f"'algo': {err}") from None
    try:
        _declared(algo_cls, AlgorithmBase, algo, "an algorithm")
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
    advantage_clip(cfg)  # refuses two different clips
    return cfg


DEFAULT_ADVANTAGE_CLIP = 5.0


def advantage_clip(cfg: Config) -> float:
    """The run's one advantage clip: the algorithm's own (its ``clip_key``, e.g. ``adv_clip``,
    which its loss also divides by) if it has one, else ``advantage.clip`` (default 5).

    A config that sets ``advantage.clip`` to another value than the algorithm's clip is refused,
    naming both keys: clipping twice at different values would make the smaller one win silently.
    """
    from advantageflow.algorithms import ALGORITHMS

    key = ALGORITHMS.get(cfg.algo).clip_key
    general = cfg.advantage.clip
    if key is None:
        return DEFAULT_ADVANTAGE_CLIP if general is None else general
    own = getattr(cfg.algorithm, key)
    if general is not None and general != own:
        raise ConfigError(
            f"advantage.clip is {general} but {cfg.algo}.{key} is {own}: {cfg.algo} clips the advantages "
            f"itself (its loss divides by {key}); set only {cfg.algo}.{key} (advantage.clip: null) or make them equal"
        )
    return own


# The main job where it differs from the class defaults (the paper's and the trainer's): six
# training draws per rollout sample, their times stratified, in one optimizer step per epoch, a
# trust region of 0.2 on each sample's target (ours), and 8 prompts x 16 samples at lr 2e-4; the
# paper's reference anchor (1e-3) stays, which keeps the run climbing past the 36 epochs
# (README, "The main job, measured"; benchmarks/results/main_job_sweep_h200.md); 40 epochs, what
# fits in the brief's 5 minutes of training on both 2-core machines we measured (the AMD EPYC is
# the slower: 7.1 s an epoch, where MKL takes no fixed code path, advantageflow/models/conv.py),
# evaluated every 20.
# ``load_config(None)`` starts from it, so `advantageflow train` with no arguments equals
# configs/shapes_advantageflow.yaml (tested).
MAIN_JOB = {
    "algo": "advantageflow",
    "advantageflow": {"draws_per_sample": 6, "stratified_times": True, "target_radius": 0.2,
                      "adaptive_weight": False},
    "train": {"prompts_per_epoch": 8, "group_size": 16, "lr": 2e-4, "epochs": 40},
    "eval": {"every": 20},
}


def load_config(path: str | None, overrides: list[str] | None = None, trusted: bool = True,
                data: dict | None = None) -> Config:
    """Read ``path`` (or ``data``, or the defaults), apply ``key=value`` overrides, validate.

    ``trusted=False`` (a config from a run folder someone else wrote) refuses any component
    named by import path (``package.module:callable``) or any command (``*_cmd`` reward
    arguments) that came from the file rather than from the overrides: opening a run folder
    must not run its author's code (``--trust-config`` lifts this).
    """
    if data is not None:
        data = dict(data)
    else:
        data = load_yaml(path) if path else copy.deepcopy(MAIN_JOB)
    if not trusted:
        refuse_code_names(data, path or "the checkpoint's recorded config", overrides or [])
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys == ["algo"] and isinstance(value, str) and data.get("algo") not in (None, value):
            # Switching algorithm from the command line drops the old section.
            data.pop(data.get("algo"), None)
        apply_override(data, keys, value)
    return build_config(data)


def _is_import_path(name: Any, registry: Any) -> bool:
    return isinstance(name, str) and name not in registry and ("." in name or ":" in name)


def code_names(data: dict) -> list[str]:
    """``key='value'`` for every import path or command a raw config names."""
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.models import MODELS
    from advantageflow.rewards import REWARDS
    from advantageflow.tasks import TASKS

    found = []
    if _is_import_path(data.get("algo"), ALGORITHMS):
        found.append(("algo", data.get("algo")))
    for key, registry in (("model", MODELS), ("task", TASKS)):
        section = data.get(key)
        if isinstance(section, dict) and _is_import_path(section.get("name"), registry):
            found.append((f"{key}.name", section.get("name")))
    reward = data.get("reward")
    if isinstance(reward, dict):
        terms = [("reward", reward)]
        comps = reward.get("components")
        if isinstance(comps, list):
            terms += [(f"reward.components[{i}]", c) for i, c in enumerate(comps) if isinstance(c, dict)]
        for where, term in terms:
            if _is_import_path(term.get("name"), REWARDS):
                found.append((f"{where}.name", term.get("name")))
            args = term.get("args")
            if isinstance(args, dict):
                found += [(f"{where}.args.{k}", v) for k, v in args.items() if str(k).endswith("cmd")]
    return [f"{k}={v!r}" for k, v in found]


def refuse_code_names(data: dict, source: str, overrides: list[str]) -> None:
    """``ConfigError`` if ``data`` (read from ``source``) names code not replaced by an override."""
    overridden = {text.split("=", 1)[0].strip() for text in overrides}
    names = [n for n in code_names(data)
             if not any(n.split("=", 1)[0].replace("[", ".").startswith(o) for o in overridden)]
    if names:
        raise ConfigError(
            f"{source} names code to import or run ({', '.join(names)}); a run folder is data, not code: "
            "pass --trust-config if you trust its author"
        )


# Keys that may change on --resume without changing the maths or the model: logging, eval and
# checkpoint cadence, the length of the run and its budgets, chunk and micro-batch sizes (the
# results do not depend on them), where things run, and caches.
RESUME_SAFE_PREFIXES = (
    "log.", "eval.", "checkpoint.", "train.epochs", "train.max_wall_s", "train.max_samples",
    "train.max_bad_steps", "train.micro_batch_size", "sampler.batch_size", "reward.async_scoring",
    "dist.timeout_s", "dist.strategy", "dist.find_unused_parameters", "dist.fsdp_reshard_after_forward",
    "device", "model.cache_dir",
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(refused, harmless)`` lists of ``key: old -> new`` between two plain configs."""
    a, b = _flatten(old), _flatten(new)
    refused, harmless = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if va == vb or (isinstance(va, list) and isinstance(vb, tuple) and list(vb) == va):
            continue
        line = f"{key}: {va!r} -> {vb!r}"
        safe = any(key == p or key.startswith(p if p.endswith(".") else p + ".") or key == p.rstrip(".")
                   for p in RESUME_SAFE_PREFIXES)
        (harmless if safe else refused).append(line)
    return refused, harmless


def _with_missing(data: dict, flat: dict[str, Any]) -> dict:
    """A copy of nested ``data`` with the dotted keys of ``flat`` added where it lacks them."""
    out = copy.deepcopy(data)
    for key, value in flat.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                if part in node:
                    break
                node[part] = {}
            node = node[part]
        else:
            node.setdefault(parts[-1], value)
    return out


def check_resume_config(recorded: dict | None, cfg: Config, allow_change: bool, where: str) -> list[str]:
    """Compare the config a checkpoint was trained with and ``cfg``; returns the accepted
    changes (to note in the log) or raises ``ConfigError`` listing the ones that change the
    maths or the model (unless ``allow_change``)."""
    if recorded is None:
        if allow_change:
            return ["the checkpoint records no config; not compared"]
        raise ConfigError(f"checkpoint '{where}' records no config, so --resume cannot check it; "
                          "pass --allow-config-change to resume anyway")
    now = cfg.to_dict()
    # Keys added to the config after the checkpoint was written, set to their default, keep
    # the old run's behaviour: fill them in so they do not count as changes.  The algorithm's
    # class defaults (not the main job's section), since those are what an absent key meant.
    defaults = _flatten(load_config(None, data={"algo": cfg.algo}).to_dict())
    recorded = _with_missing(recorded, {k: v for k, v in _flatten(now).items() if defaults.get(k, object()) == v})
    refused, harmless = config_differences(recorded, now)
    if refused and not allow_change:
        raise ConfigError(
            f"--resume: the config differs from the one checkpoint '{where}' was trained with: "
            f"{'; '.join(refused)} (pass --allow-config-change to resume anyway)"
        )
    return refused + harmless


REWARD_ARG_RANGES_ATTR = "arg_ranges"


def check_reward_args(term: RewardTerm, where: str) -> None:
    """Numbers in a reward's ``args``: finite, and inside the ranges its factory declares.

    A factory may declare ``arg_ranges = {"width": ((">", 0),), "modes": ((">=", 0), ("<=", 7))}``
    (a list argument is checked item by item and must not be empty).
    """
    for key, value in term.args.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"'{where}.args.{key}' must be finite, got {v}")
    from advantageflow.rewards import REWARDS
    from advantageflow.rewards.base import check_factory_args

    try:
        factory = REWARDS.get(term.name)
    except RegistryError as err:
        raise ConfigError(f"'{where}.name': {err}") from None
    try:
        check_factory_args(factory, term.args)
    except ValueError as err:
        raise ConfigError(f"'{where}.args': reward '{term.name}': {err}") from None
    ops = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    for key, bounds in (getattr(factory, REWARD_ARG_RANGES_ATTR, None) or {}).items():
        if key not in term.args:
            continue
        value = term.args[key]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not items:
            raise ConfigError(f"'{where}.args.{key}' must not be empty")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"'{where}.args.{key}' must hold numbers, got {v!r}")
            for op, bound in bounds:
                if not ops[op](float(v), float(bound)):
                    raise ConfigError(f"'{where}.args.{key}' must be {op} {bound}, got {v}")


def reward_keys(cfg: RewardConfig) -> list[str]:
    """The config key naming each reward term: ``reward.name`` or ``reward.components[i].name``."""
    if not cfg.components:
        return ["reward.name"]
    return [f"reward.components[{i}].name" for i in range(len(cfg.components))]


def convention_notes(cfg: Config) -> list[str]:
    """One line per setting outside the algorithm's section that differs from what the method's
    authors use (the algorithm's ``conventions``, :mod:`advantageflow.algorithms.base`)."""
    from advantageflow.algorithms import ALGORITHMS

    notes = []
    for key, (want, why) in ALGORITHMS.get(cfg.algo).conventions.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node != want:
            notes.append(f"note: {key} is {node!r}; {why} (set {key}={want} to follow the authors)")
    return notes


def preflight(cfg: Config) -> None:
    """Every check ``train`` makes before loading weights (``validate`` runs it too): reward
    names and arguments, the device, the model's path, the prompt files, and whether the
    algorithm can use the reward (DRaFT needs a differentiable one), beyond the per-key checks."""
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.build import build_task
    from advantageflow.models import MODELS
    from advantageflow.rewards.base import check_reward_gradient

    terms = cfg.reward.terms()
    if not terms:
        raise ConfigError("no reward configured: set reward.name (or reward.components)")
    rewards = []
    for key, term in zip(reward_keys(cfg.reward), terms):
        check_reward_args(term, key.removesuffix(".name"))
        # Cheap rewards are built (their constructors' checks run); the others are judged by factory.
        rewards.append((key, term.name, _built_if_cheap(term, key.removesuffix(".name"))))
    check_reward_gradient(cfg.algo, ALGORITHMS.get(cfg.algo), rewards)
    _check_device(cfg.device)
    MODELS.get(cfg.model.name).preflight(cfg.model)  # e.g. model.path: a folder, a hub id or tiny:KIND
    build_task(cfg)  # reads prompt files: a bad one fails here, not after the model loads
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb is true but the 'wandb' package is not installed: "
                          "pip install 'advantageflow[wandb]' (or set log.wandb=false)")


def _built_if_cheap(term: RewardTerm, where: str) -> Any:
    """The built reward if its factory ``builds_cheaply`` (no weights, no network), else the factory."""
    from advantageflow.build import build_reward_term
    from advantageflow.rewards import REWARDS

    factory = REWARDS.get(term.name)
    return build_reward_term(term, where) if getattr(factory, "builds_cheaply", False) else factory


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available here; use device=cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("device=mps but MPS is not available here; use device=cpu or auto")


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
    "check_resume_config",
    "closest",
    "config_differences",
    "load_config",
    "convention_notes",
    "preflight",
    "reward_keys",
]
