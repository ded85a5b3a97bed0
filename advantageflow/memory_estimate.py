"""Peak memory per process of a config's training step, computed without weights.

``advantageflow estimate-memory CONFIG`` builds the config's transformer from its architecture
alone (``torch.device("meta")``), turns every parameter into a fake tensor
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no storage), and runs
the steady-state optimizer step of the config with the real adapter and algorithm code
(SD3, FLUX) -- LoRA or full fine-tuning, gradient checkpointing, the reference / old-policy
passes under ``no_grad``, the loss's backward, gradient clipping, AdamW -- while
:class:`LiveBytes` adds up the bytes of every live tensor storage.  On a CUDA config the
frozen weights are in ``model.dtype`` and the passes run under bf16/fp16 autocast (emulated by
CPU autocast on the fake tensors); on the CPU everything is float32, as the adapters do.

Where the architecture comes from (:func:`resolve_arch`): a local pipeline folder (or
``tiny:KIND``) -- its ``transformer/config.json`` and the safetensors headers of the other
components; a hub id found in the local Hugging Face cache; otherwise the published settings
shipped in ``advantageflow/assets/arch/*.json`` (SD3.5-Medium, FLUX.1-dev, Qwen-Image), so
no download is needed.

Qwen-Image has no adapter here: ``--arch qwen-image`` (or a config whose ``model.name`` is
``qwen_image``) takes the separate path :func:`_transformer_only_step`, the transformer class
and its arch json only, with AdvantageFlow's passes (reference and old policy under
``no_grad``, then theta with gradient).

Not counted: the rollouts (sampling under ``no_grad`` at ``sampler.batch_size``, VAE decoding),
the reward model, CUDA's context and kernel workspaces, and allocator fragmentation; the text
encoders and the VAE are reported as resident weights (``resident_gib``), not traced.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import struct
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from advantageflow.configbase import ConfigError

GIB = 2**30
ARCH_DIR = Path(__file__).resolve().parent / "assets" / "arch"
#: families with an adapter in this package (the real policy and algorithm code runs).
ADAPTER_FAMILIES = ("sd3", "flux")
#: the published architectures shipped as json, by the name ``--arch`` takes.
SHIPPED_ARCHS = ("sd3.5-medium", "flux.1-dev", "qwen-image")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- counting live bytes


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage an operation creates while it is alive.

    Each output storage not seen before is counted once (views share their base's storage)
    and uncounted when it is freed (a weak reference to the storage).  ``peak`` is the
    maximum of ``current`` since the last :meth:`reset_peak`.  With ``fake=True`` a request
    for a tensor's value (``.item()``, ``float(t)``) answers 1 instead of failing: the values
    of fake tensors do not exist, and none of them changes what is allocated.
    """

    def __init__(self, fake: bool = False) -> None:
        super().__init__()
        self.fake = fake
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def track(self, t: Tensor) -> None:
        """Count ``t``'s storage if it is new."""
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()

        def freed(_ref: Any, key: int = key, nbytes: int = nbytes) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= nbytes

        self._live[key] = weakref.ref(storage, freed)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                self.track(t)
        return out


# --------------------------------------------------------------------------- architectures


@dataclass
class Arch:
    """What the estimate needs to know about a model without its weights.

    Attributes:
        family: ``sd3``, ``flux`` (adapters) or ``qwen_image`` (transformer only).
        transformer: the transformer's ``config.json`` (``_class_name`` names the diffusers class).
        vae_scale_factor: pixels per latent cell.
        resident_params: parameter count of each other component kept on the device
            (text encoders, VAE), by component name.
        source: where it was read from.
    """

    family: str
    transformer: dict
    vae_scale_factor: int
    resident_params: dict[str, int]
    source: str


def shipped_arch(name: str) -> Arch:
    """A shipped architecture (``advantageflow/assets/arch/NAME.json``)."""
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"no shipped architecture '{name}' (known: {', '.join(SHIPPED_ARCHS)})")
    data = json.loads(path.read_text(encoding="utf-8"))
    return Arch(
        data["family"],
        data["transformer"],
        int(data["vae_scale_factor"]),
        {k: int(v) for k, v in data["resident_params"].items()},
        f"shipped {path.name}",
    )


def _shipped_for_hub_id(hub_id: str) -> Arch | None:
    for name in SHIPPED_ARCHS:
        data = json.loads((ARCH_DIR / f"{name}.json").read_text(encoding="utf-8"))
        if hub_id in data["hub_ids"]:
            return shipped_arch(name)
    return None


def safetensors_numel(folder: Path) -> int:
    """Parameters in the ``*.safetensors`` files of ``folder``, read from their headers only."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _vae_scale_factor(vae_config: dict) -> int:
    if "temperal_downsample" in vae_config:  # the Wan-style VAE of Qwen-Image
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def folder_arch(folder: Path, family: str) -> Arch:
    """The architecture of a diffusers pipeline folder (configs and safetensors headers)."""
    transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    resident = {d.name: safetensors_numel(d) for d in _resident_folders(folder)}
    return Arch(family, transformer, _vae_scale_factor(vae_config), resident, str(folder))


def _resident_folders(folder: Path) -> list[Path]:
    """The text encoders' and the VAE's folders of a pipeline folder."""
    return [
        d for d in sorted(folder.iterdir()) if d.is_dir() and (d.name.startswith("text_encoder") or d.name == "vae")
    ]


def _cached_hub_folder(hub_id: str) -> Path | None:
    """The local snapshot of ``hub_id`` if the Hugging Face cache holds its transformer config."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on it
        return None
    found = try_to_load_from_cache(hub_id, "transformer/config.json")
    if not isinstance(found, str):
        return None
    folder = Path(found).parent.parent
    if not (folder / "vae" / "config.json").is_file():
        return None
    # A partial download would under-count the resident weights: then the shipped counts are better.
    complete = all(any(d.glob("*.safetensors")) for d in _resident_folders(folder))
    return folder if complete else None


def resolve_arch(model_cfg: Any, arch: str = "") -> Arch:
    """The architecture of ``model_cfg`` (see the module docstring); ``arch`` names a shipped
    one and overrides ``model.path``."""
    if arch:
        return shipped_arch(arch)
    family = model_cfg.name
    from advantageflow.models.diffusers_common import TINY_PREFIX, resolve_path

    path = model_cfg.path
    local = Path(resolve_path(path) if path.startswith(TINY_PREFIX) else os.path.expanduser(path))
    if local.is_dir():
        return folder_arch(local, family)
    cached = _cached_hub_folder(path)
    if cached is not None:
        return folder_arch(cached, family)
    shipped = _shipped_for_hub_id(path)
    if shipped is None:
        raise ConfigError(
            f"model.path '{path}' is neither a local folder nor in the Hugging Face cache, and no shipped "
            f"architecture has that hub id (give --arch: {', '.join(SHIPPED_ARCHS)})"
        )
    return shipped


# --------------------------------------------------------------------------- the result


@dataclass
class MemoryEstimate:
    """Peak memory of one process during a training step, in GiB (``2**30`` bytes).

    Attributes:
        peak_gib: the step's peak: every field below up to ``activations_gib`` together.
        weights_gib: the transformer's frozen weights (and the frozen copy for full fine-tuning).
        trainable_gib: the trained parameters (LoRA, or the whole float32 transformer).
        gradients_gib: their gradients (the trained parameters' size).
        optimizer_gib: AdamW's two moments.
        snapshots_gib: the algorithm's copies of the trained parameters (old / EMA policy).
        rollout_gib: the epoch's rollout buffer this process trains on (latents, noise,
            prompt embeddings per sample, trajectories when the algorithm keeps them).
        activations_gib: the rest of the peak: saved activations and temporaries of one
            micro-batch's passes.
        resident_gib: weights of the text encoders and VAE kept on the device (not traced).
        total_gib: ``peak_gib + resident_gib``.
    """

    model: str
    arch_source: str
    device: str
    dtype: str
    micro_batch_size: int
    rows_per_pass: int
    tokens: int
    peak_gib: float
    weights_gib: float
    trainable_gib: float
    gradients_gib: float
    optimizer_gib: float
    snapshots_gib: float
    rollout_gib: float
    activations_gib: float
    resident_gib: float
    total_gib: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """A short human-readable table."""
        rows = [
            ("peak of the training step", self.peak_gib),
            ("  transformer weights (frozen)", self.weights_gib),
            ("  trained parameters", self.trainable_gib),
            ("  gradients", self.gradients_gib),
            ("  AdamW moments", self.optimizer_gib),
            ("  old / EMA policy copies", self.snapshots_gib),
            ("  rollout buffer", self.rollout_gib),
            ("  activations and temporaries", self.activations_gib),
            ("resident text encoders and VAE", self.resident_gib),
            ("total per process", self.total_gib),
        ]
        unit, scale = ("GiB", 1.0) if self.total_gib >= 1 else ("MiB", 1024.0)
        head = (
            f"{self.model} ({self.arch_source}) on {self.device}, {self.dtype}: micro-batch "
            f"{self.micro_batch_size} ({self.rows_per_pass} rows per pass), {self.tokens} tokens per row"
        )
        return (
            [head] + [f"{name:<34}{gib * scale:9.2f} {unit}" for name, gib in rows] + [f"note: {n}" for n in self.notes]
        )


# --------------------------------------------------------------------------- fake weights


def meta_transformer(config: dict, dtype: torch.dtype) -> nn.Module:
    """The diffusers transformer ``config["_class_name"]`` on the meta device, stored in
    ``dtype`` except its ``_keep_in_fp32_modules`` (as ``from_pretrained(torch_dtype=...)``)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    verbosity = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # .to(dtype) warns that from_pretrained would keep fp32 modules: we do
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_config(config)
            model.to(dtype)
    finally:
        diffusers.logging.set_verbosity(verbosity)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return model


def _fake_like(t: Tensor, memo: dict[int, Tensor]) -> Tensor:
    """A fake CPU tensor of ``t``'s shape and dtype (created under the active fake mode)."""
    if id(t) not in memo:
        memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    return memo[id(t)]


def fakeify(root: Any, memo: dict[int, Tensor] | None = None) -> None:
    """Replace every parameter, buffer and tensor attribute of the modules under ``root``
    (a module, or an object whose attributes hold modules and tensors) by fake CPU tensors."""
    memo = {} if memo is None else memo
    objects = root.modules() if isinstance(root, nn.Module) else [root]
    for obj in objects:
        if isinstance(obj, nn.Module):
            for name, p in list(obj._parameters.items()):
                if p is not None:
                    obj._parameters[name] = nn.Parameter(_fake_like(p, memo), requires_grad=p.requires_grad)
            for name, b in list(obj._buffers.items()):
                if b is not None:
                    obj._buffers[name] = _fake_like(b, memo)
        for name, value in list(vars(obj).items()):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and value.device.type == "meta":
                setattr(obj, name, _fake_like(value, memo))
            elif isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
                setattr(obj, name, [_fake_like(v, memo) if v.device.type == "meta" else v for v in value])


# --------------------------------------------------------------------------- one step


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Phases:
    """Bytes live after each part of the set-up, and the step's peak."""

    weights: int = 0
    trainable: int = 0
    snapshots: int = 0
    optimizer: int = 0
    rollout: int = 0
    peak: int = 0


def rows_per_process(cfg: Any, world_size: int) -> int:
    """Samples of one epoch's rollout that one process holds and trains on."""
    return max(1, math.ceil(cfg.train.prompts_per_epoch * cfg.train.group_size / max(1, world_size)))


def _optimizer(params: list[Tensor], cfg: Any) -> torch.optim.Optimizer:
    """AdamW as :func:`advantageflow.optim.build_optimizer`; on CUDA PyTorch defaults to the
    ``foreach`` implementation (whose temporaries span every parameter), so it is asked for."""
    t = cfg.train
    return torch.optim.AdamW(
        params,
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        foreach=cfg.device.startswith("cuda") or None,
    )


def _init_optimizer_state(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """Allocate AdamW's moments (a first step on zero gradients), as after the first update."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _autocast(cfg: Any, simulate_cuda: bool) -> contextlib.AbstractContextManager:
    """What the adapters' CUDA autocast does, emulated on (fake) CPU tensors."""
    dtype = DTYPES[cfg.model.dtype]
    if simulate_cuda and dtype != torch.float32:
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


class _Pipe:
    """The part of a diffusers pipeline the adapters' constructors read (no weights)."""

    def __init__(self, transformer: nn.Module, vae_scale_factor: int) -> None:
        self.transformer = transformer
        self.vae_scale_factor = vae_scale_factor
        self.components = {"transformer": transformer}


def build_policy(cfg: Any, arch: Arch, storage: torch.dtype) -> Any:
    """The config's adapter around a meta-device transformer (LoRA, frozen copy, checkpointing
    as in training); :func:`fakeify` it before running anything."""
    from advantageflow.models.diffusers_flux import FluxPolicy
    from advantageflow.models.diffusers_sd3 import SD3Policy

    cls = {"sd3": SD3Policy, "flux": FluxPolicy}[arch.family]
    transformer = meta_transformer(arch.transformer, storage)
    return cls(cfg.model, _Pipe(transformer, arch.vae_scale_factor), device="meta")


def make_rollout(policy: Any, cfg: Any, algo: Any, rows: int) -> Any:
    """A rollout of ``rows`` samples shaped as the trainer's: latents, noise, per-sample prompt
    embeddings (as :meth:`DiffusersPolicy.encode` gives them), advantages, and the trajectory /
    log-probabilities when the algorithm asks for them."""
    from advantageflow.types import Rollout

    m = policy.transformer.config
    steps = cfg.sampler.steps
    shape = (rows, *policy.sample_shape)
    if cfg.model.name == "sd3":  # CLIP's 77 tokens, then T5's
        text = (77 + cfg.model.max_sequence_length, m.joint_attention_dim)
    else:
        text = (cfg.model.max_sequence_length, m.joint_attention_dim)
    cond = {
        "prompt_embeds": torch.randn(rows, *text, dtype=policy.dtype),
        "pooled_prompt_embeds": torch.randn(rows, m.pooled_projection_dim, dtype=policy.dtype),
    }
    if policy._encodes_negative():
        for key in policy.NEGATIVE_KEYS:
            cond[key] = torch.randn_like(cond[key.removeprefix("negative_")])
    request = algo.sampler_request(0, torch.Generator().manual_seed(0))
    stochastic = request.stochastic != "none"
    return Rollout(
        x0=torch.randn(shape),
        noise=torch.randn(shape),
        cond=cond,
        prompts=[""] * rows,
        group_ids=torch.arange(rows) // cfg.train.group_size,
        grid=torch.linspace(1.0, 0.0, steps + 1),
        trajectory=torch.randn(rows, steps + 1, *policy.sample_shape)
        if request.keep_trajectory or stochastic
        else None,
        log_probs=torch.randn(rows, steps) if stochastic else None,
        advantages=torch.randn(rows),
    )


def _age_old_policies(algo: Any) -> None:
    """Make the algorithm's old / EMA policy differ from theta, as on every step but an epoch's
    first, so its extra ``no_grad`` pass runs."""
    from advantageflow.algorithms.common import LaggedPolicy

    for value in vars(algo).values():
        if isinstance(value, LaggedPolicy):
            value.fresh = False


def adapter_step(policy: Any, cfg: Any, rows: int, meter: Any, simulate_cuda: bool) -> _Phases:
    """The steady-state optimizer step of ``cfg`` on ``policy`` (fake or real weights),
    measured by ``meter`` (``current`` bytes now, ``peak`` since ``reset_peak``: :class:`LiveBytes`;
    a real run reads the profiler afterwards, :func:`measure_cpu_step`): the algorithm and its
    snapshots, AdamW's moments, the rollout buffer, then two micro-batches (the second
    accumulates into existing gradients), clipping and the AdamW update."""
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.algorithms.base import TrainContext

    phases = _Phases(weights=meter.current)
    params = policy.trainable_parameters()
    phases.trainable = _nbytes(params)
    algo = ALGORITHMS.get(cfg.algo)(cfg.algorithm, policy)
    phases.snapshots = meter.current - phases.weights
    optimizer = _optimizer(params, cfg)
    _init_optimizer_state(optimizer, params)
    phases.optimizer = meter.current - phases.weights - phases.snapshots
    rollout = make_rollout(policy, cfg, algo, rows)
    phases.rollout = meter.current - phases.weights - phases.snapshots - phases.optimizer
    algo.begin_epoch(policy)
    _age_old_policies(algo)
    policy.set_mode(training=True)
    meter.reset_peak()
    micro = cfg.train.micro_batch_size
    optimizer.zero_grad(set_to_none=True)
    for i in range(min(2, math.ceil(rows / micro))):
        chunk = torch.arange(i * micro, min(rows, (i + 1) * micro))
        ctx = TrainContext(
            policy=policy, generator=torch.Generator().manual_seed(i), step=1, guidance_scale=cfg.sampler.guidance_scale
        )
        with _autocast(cfg, simulate_cuda):
            for term in algo.losses(rollout.select(chunk), ctx):
                (term.loss * (len(chunk) / rows)).backward()
    grad_clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=simulate_cuda or None)
    optimizer.step()
    phases.peak = meter.peak
    return phases


# --------------------------------------------------------------------------- Qwen-Image (no adapter)


def qwen_image_inputs(model: nn.Module, cfg: Any, rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments ``QwenImagePipeline.__call__`` gives the transformer for ``rows``
    samples: packed latents ``(rows, h/2 * w/2, 64)`` and ``model.max_sequence_length`` text
    tokens of Qwen2.5-VL width (the longest prompt the pipeline allows; shorter prompts cost less),
    all of them real tokens (no padding mask)."""
    c = model.config
    f = cfg.vae_scale_factor
    h, w = cfg.model.height // f // 2, cfg.model.width // f // 2
    length = cfg.model.max_sequence_length
    return {
        "hidden_states": torch.randn(rows, h * w, c.in_channels, dtype=dtype),
        "encoder_hidden_states": torch.randn(rows, length, c.joint_attention_dim, dtype=dtype),
        "encoder_hidden_states_mask": None,  # the pipeline passes None when no prompt is padded
        "timestep": torch.rand(rows),
        "img_shapes": [[(1, h, w)]] * rows,
        "return_dict": False,
    }


@dataclass
class _QwenCfg:
    """What :func:`qwen_image_inputs` reads (the trainer's config plus the VAE factor)."""

    model: Any
    vae_scale_factor: int


def build_transformer_only(cfg: Any, arch: Arch, storage: torch.dtype) -> tuple[nn.Module, nn.Module | None]:
    """The transformer (meta device) as training would hold it: LoRA on the frozen weights, or
    a float32 trained copy plus the frozen one (returned second, else ``None``)."""
    from advantageflow.models.diffusers_common import add_lora

    model = meta_transformer(arch.transformer, storage)
    reference = None
    if cfg.model.lora.enabled:
        add_lora(model, cfg.model.lora)
    else:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        model.float().requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return model, reference


def _transformer_only_step(
    cfg: Any,
    arch: Arch,
    nets: tuple[nn.Module, nn.Module | None],
    storage: torch.dtype,
    rows: int,
    meter: LiveBytes,
    simulate_cuda: bool,
) -> _Phases:
    """Qwen-Image's step from the transformer class alone (there is no adapter): weights, LoRA
    (or a float32 copy and a frozen one), AdvantageFlow's old-policy snapshot, AdamW's moments,
    a rollout buffer of latents, noise and prompt embeddings, then per micro-batch the reference
    and old passes under ``no_grad`` and theta's pass with its backward (two micro-batches),
    clipping and the update."""
    model, reference = nets
    fakeify(model)
    if reference is not None:
        fakeify(reference)
    phases = _Phases(weights=meter.current)
    params = [p for p in model.parameters() if p.requires_grad]
    phases.trainable = _nbytes(params)
    snapshot = [p.detach().clone() for p in params]
    phases.snapshots = meter.current - phases.weights
    optimizer = _optimizer(params, cfg)
    _init_optimizer_state(optimizer, params)
    phases.optimizer = meter.current - phases.weights - phases.snapshots
    qcfg = _QwenCfg(cfg.model, arch.vae_scale_factor)
    c = model.config
    f = arch.vae_scale_factor
    latent = (c.out_channels, cfg.model.height // f, cfg.model.width // f)
    buffer = {
        "x0": torch.randn(rows, *latent),
        "noise": torch.randn(rows, *latent),
        "text": qwen_image_inputs(model, qcfg, rows, storage)["encoder_hidden_states"],
    }
    phases.rollout = meter.current - phases.weights - phases.snapshots - phases.optimizer
    meter.reset_peak()
    micro = cfg.train.micro_batch_size
    optimizer.zero_grad(set_to_none=True)
    for i in range(min(2, math.ceil(rows / micro))):
        n = min(micro, rows - i * micro)
        inputs = qwen_image_inputs(model, qcfg, n, storage)
        inputs["encoder_hidden_states"] = buffer["text"][i * micro : i * micro + n]
        with _autocast(cfg, simulate_cuda):
            with torch.no_grad():
                if reference is not None:
                    f_ref = reference(**inputs)[0].float()
                else:
                    model.disable_adapters()
                    f_ref = model(**inputs)[0].float()
                    model.enable_adapters()
                    for p in params:
                        p.requires_grad_(True)
                saved = [p.detach().clone() for p in params]
                for p, s in zip(params, snapshot):
                    p.copy_(s)
                f_old = model(**inputs)[0].float()
                for p, s in zip(params, saved):
                    p.copy_(s)
                del saved
            f_theta = model(**inputs)[0].float()
            loss = ((f_theta - f_old) ** 2).mean() + ((f_theta - f_ref) ** 2).mean()
        loss.backward()
        del f_theta, f_old, f_ref, loss
    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"), foreach=simulate_cuda or None)
    optimizer.step()
    phases.peak = meter.peak
    return phases


# --------------------------------------------------------------------------- the estimate


def _tokens(arch: Arch, cfg: Any) -> int:
    """Image plus text tokens per row of one transformer pass."""
    f = arch.vae_scale_factor
    image = (cfg.model.height // f // 2) * (cfg.model.width // f // 2)
    text = cfg.model.max_sequence_length + (77 if arch.family == "sd3" else 0)
    return image + text


def _resident_bytes(arch: Arch, cfg: Any, element: int) -> tuple[int, list[str]]:
    """Weights of the text encoders and VAE on this device, and what is left out."""
    notes, total = [], 0
    for name, numel in arch.resident_params.items():
        if name.startswith("text_encoder") and (cfg.model.release_text_encoders or cfg.model.text_encoder_device):
            continue
        total += numel * element
    if cfg.model.release_text_encoders:
        notes.append("text encoders released after the prompts are cached (model.release_text_encoders): not counted")
    elif cfg.model.text_encoder_device:
        notes.append(f"text encoders on {cfg.model.text_encoder_device} (model.text_encoder_device): not counted")
    return total, notes


def estimate_memory(cfg: Any, arch_name: str = "", world_size: int = 1) -> MemoryEstimate:
    """The peak memory per process of ``cfg``'s training step (see the module docstring).

    Args:
        cfg: a loaded :class:`~advantageflow.config.Config` with a diffusers model.
        arch_name: a shipped architecture (``qwen-image``, ...) to use instead of ``model.path``'s.
        world_size: processes sharing the epoch's rollouts (each trains on its share; DDP).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if cfg.model.name not in (*ADAPTER_FAMILIES, "qwen_image") and not arch_name:
        raise ConfigError(
            f"estimate-memory covers the diffusers models (sd3, flux, qwen_image), not '{cfg.model.name}'"
        )
    if cfg.algo == "draft":
        raise ConfigError("estimate-memory does not model DRaFT (it back-propagates through the sampling chain)")
    arch = resolve_arch(cfg.model, arch_name)
    simulate_cuda = cfg.device.startswith("cuda") or cfg.device == "auto"
    storage = DTYPES[cfg.model.dtype] if simulate_cuda else torch.float32
    rows = rows_per_process(cfg, world_size)
    notes: list[str] = []
    adapter = arch.family in ADAPTER_FAMILIES
    if adapter and arch.family != cfg.model.name:
        raise ConfigError(f"--arch {arch_name} is a {arch.family} model; the config's model is {cfg.model.name}")
    # Built on the meta device outside the fake mode (module.to() cannot swap fake tensors).
    built = build_policy(cfg, arch, storage) if adapter else build_transformer_only(cfg, arch, storage)
    meter = LiveBytes(fake=True)
    with FakeTensorMode(allow_non_fake_inputs=True), meter:
        if adapter:
            policy = built
            for part in (policy.transformer, policy.ref_transformer, policy):
                if part is not None:
                    fakeify(part)
            policy.device, policy.dtype = torch.device("cpu"), storage
            phases = adapter_step(policy, cfg, rows, meter, simulate_cuda)
        else:
            notes.append(
                f"{arch.family}: no adapter here; the transformer alone with AdvantageFlow's passes "
                f"(reference and old under no_grad, theta with gradient), {cfg.model.max_sequence_length} text tokens"
            )
            phases = _transformer_only_step(cfg, arch, built, storage, rows, meter, simulate_cuda)
    element = torch.empty((), dtype=storage).element_size()
    resident, resident_notes = _resident_bytes(arch, cfg, element)
    notes += resident_notes
    if cfg.train.optimizer == "adamw8bit":
        notes.append("train.optimizer=adamw8bit is estimated as float32 AdamW (its moments take a quarter of that)")
    if world_size > 1 and cfg.dist.strategy == "fsdp":
        notes.append("dist.strategy=fsdp is estimated unsharded (every process as with DDP)")
    if world_size > 1 and cfg.dist.strategy == "ddp":
        notes.append("DDP's gradient buckets (about one more copy of the gradients) are not counted")
    cfg_factor = 2 if cfg.algo == "flow_grpo" and cfg.sampler.guidance_scale != 1.0 else 1
    frozen = phases.weights - phases.trainable
    static = phases.weights + phases.snapshots + phases.optimizer + phases.rollout
    gib = GIB
    return MemoryEstimate(
        model=cfg.model.name if not arch_name else arch_name,
        arch_source=arch.source,
        device="cuda" if simulate_cuda else "cpu",
        dtype=str(storage).removeprefix("torch."),
        micro_batch_size=cfg.train.micro_batch_size,
        rows_per_pass=min(cfg.train.micro_batch_size, rows) * cfg_factor,
        tokens=_tokens(arch, cfg),
        peak_gib=phases.peak / gib,
        weights_gib=frozen / gib,
        trainable_gib=phases.trainable / gib,
        gradients_gib=phases.trainable / gib,
        optimizer_gib=phases.optimizer / gib,
        snapshots_gib=phases.snapshots / gib,
        rollout_gib=phases.rollout / gib,
        activations_gib=(phases.peak - static - phases.trainable) / gib,
        resident_gib=resident / gib,
        total_gib=(phases.peak + resident) / gib,
        notes=notes,
    )


# --------------------------------------------------------------------------- a real CPU run


class _NoMeter:
    """A meter that reads nothing during the run (the profiler's records are read after it)."""

    current = 0
    peak = 0

    def reset_peak(self) -> None:
        return None


def allocation_records(prof: Any) -> list[tuple[int, int, int]]:
    """``(time_ns, bytes, allocator's running total)`` of every CPU allocation (bytes > 0) and
    free (bytes < 0) a ``torch.profiler.profile(profile_memory=True)`` recorded, in order."""
    from torch._C._profiler import _EventType

    stack, out = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            out.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    return sorted(out)


def live_policy_bytes(policy: Any) -> int:
    """Bytes of the distinct storages the policy holds: the transformer's (and the frozen
    copy's) parameters and buffers, and its own tensor attributes."""
    tensors = [v for v in vars(policy).values() if isinstance(v, Tensor)]
    for net in (policy.transformer, policy.ref_transformer):
        if net is not None:
            tensors += list(net.parameters()) + list(net.buffers())
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def measure_cpu_step(cfg: Any) -> int:
    """Peak bytes of ``cfg``'s training step run for real on the CPU (float32), to check
    :func:`estimate_memory` against: the pipeline (``tiny:KIND`` or a folder) is loaded, its
    text encoders and VAE dropped, and :func:`adapter_step` runs under the profiler; the peak
    is the policy's weights plus the highest running total of the allocator's records."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    from advantageflow.models.diffusers_flux import FluxPolicy
    from advantageflow.models.diffusers_sd3 import SD3Policy

    policy = {"sd3": SD3Policy, "flux": FluxPolicy}[cfg.model.name].from_config(cfg.model, "cpu")
    for name, module in list(policy.pipe.components.items()):
        if name != "transformer" and isinstance(module, nn.Module):
            setattr(policy.pipe, name, None)
    gc.collect()
    base = live_policy_bytes(policy)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        adapter_step(policy, cfg, rows_per_process(cfg, 1), _NoMeter(), simulate_cuda=False)
    records = allocation_records(prof)
    origin = records[0][2] - records[0][1]
    return base + max(total for _, _, total in records) - origin
