"""The ``advantageflow`` command.

    advantageflow train [CONFIG] [key=value ...] [--run-dir DIR] [--resume [--allow-config-change]]
    advantageflow validate CONFIG [key=value ...]
    advantageflow estimate-memory CONFIG [key=value ...] [--arch NAME] [--world-size N] [--json]
    advantageflow eval [CONFIG] [key=value ...] [--checkpoint DIR] [--task NAME] [--json]
    advantageflow sample [CONFIG] [key=value ...] --checkpoint DIR --prompt TEXT [--num N] [--index I] [--out DIR]
    advantageflow pretrain shapes [...]
    advantageflow serve-reward NAME [...]
    advantageflow convert-reward hpsv2|imagereward CHECKPOINT OUT [...]
    advantageflow configs [NAME ...] [--to DIR [--force]]
    advantageflow --version

Bad input ends with one line on stderr and exit status 2; a failure while running (a damaged
checkpoint, a failing reward, a full disk) with one line and exit status 1; never a
traceback.  SIGTERM is handled like Ctrl-C (exit 143).  A run folder's config is data: the
code it names (``package.module:callable``) is imported only with ``--trust-config``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from advantageflow.cpu_memory import reuse_freed_memory

EXIT_RUNTIME, EXIT_USAGE = 1, 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    from advantageflow.configbase import ConfigError
    from advantageflow.registry import RegistryError

    return (ConfigError, RegistryError, FileNotFoundError)


def _runtime_errors() -> tuple[type[BaseException], ...]:
    from advantageflow.checkpoint import CheckpointError
    from advantageflow.rewards.base import RewardError
    from advantageflow.trainer import TrainingError

    return (CheckpointError, TrainingError, RewardError, OSError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror:
        where = f" '{err.filename}'" if err.filename else ""
        text = f"{err.strerror}{where}"
    return text or type(err).__name__


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: the first item without '=' is the config file."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and config is None:
            config = item
        elif "=" not in item:
            from advantageflow.configbase import ConfigError

            raise ConfigError(f"unexpected argument '{item}' (overrides look like key.subkey=value)")
        else:
            overrides.append(item)
    return config, overrides


def _load(items: list[str]):
    from advantageflow.config import load_config

    config, overrides = _split_config_args(items)
    return load_config(config, overrides)


def _resolve_checkpoint(path: str) -> tuple[Path, Path]:
    """A checkpoint folder or a run folder (its newest intact checkpoint) -> (checkpoint, run folder)."""
    from advantageflow.checkpoint import MANIFEST, latest_checkpoint
    from advantageflow.configbase import ConfigError

    p = Path(path)
    if (p / "policy.safetensors").exists() or (p / MANIFEST).exists():
        return p, p.parent.parent
    latest = latest_checkpoint(p / "checkpoints")
    if latest is None:
        raise ConfigError(f"'{path}' is neither a checkpoint nor a run folder with checkpoints")
    return latest, p


def _config_for_checkpoint(items: list[str], checkpoint: str | None, trust: bool = False):
    """The run's own config.yaml when a checkpoint is given (overrides still apply); the code
    it names is refused unless ``trust``."""
    from advantageflow.config import load_config

    config, overrides = _split_config_args(items)
    ckpt = run = None
    from_run = False
    if checkpoint:
        ckpt, run = _resolve_checkpoint(checkpoint)
        if config is None and (run / "config.yaml").exists():
            config, from_run = str(run / "config.yaml"), True
    return load_config(config, overrides, trusted=trust or not from_run), ckpt


def _load_policy(cfg, ckpt):
    from advantageflow.build import build_components
    from advantageflow.checkpoint import load_checkpoint

    parts = build_components(cfg, cfg.device if cfg.device != "auto" else "cpu")
    if ckpt is not None:
        parts.policy.load_trainable_state(load_checkpoint(ckpt).policy)
    parts.policy.set_mode(training=False)  # `eval` and `sample` only sample: no dropout
    return parts


def _resume_config(items: list[str], run_dir: str | None, trust: bool):
    """``train --resume --run-dir DIR`` without CONFIG: the config the newest intact
    checkpoint was trained with (data from a run folder: its code names need --trust-config)."""
    from advantageflow.checkpoint import latest_checkpoint
    from advantageflow.config import load_config

    config, overrides = _split_config_args(items)
    if config is not None or not run_dir:
        return None
    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    if latest is None:
        return None
    try:
        recorded = json.loads((latest / "trainer.json").read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        return None
    print(f"[advantageflow] --resume without CONFIG: using the config recorded in {latest}")
    return load_config(None, overrides, trusted=trust, data=recorded)


def cmd_train(args: argparse.Namespace) -> int:
    from advantageflow.trainer import train

    cfg = (_resume_config(args.items, args.run_dir, args.trust_config) if args.resume else None) or _load(args.items)
    run_dir = args.run_dir or f"runs/{cfg.algo}-{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    train(cfg, run_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_before_interpreter_teardown(0)
    return 0


def _exit_before_interpreter_teardown(code: int) -> None:
    """End a finished ``torchrun`` worker without Python's interpreter teardown.

    Training is over, its files are written and closed and the process group is destroyed,
    but torch can keep the gloo group alive past ``destroy_process_group`` (FSDP2's device
    mesh stays referenced from DTensor's caches).  A gloo thread that then releases a tensor
    during the teardown needs the GIL and aborts the process (SIGABRT, "terminate called
    without an active exception"), so torchrun reports a failed run that succeeded.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_validate(args: argparse.Namespace) -> int:
    from advantageflow.config import convention_notes, preflight

    cfg = _load(args.items)
    preflight(cfg)
    for line in convention_notes(cfg):
        print(line)
    print(
        f"ok: algo={cfg.algo} model={cfg.model.name} task={cfg.task.name} "
        f"reward={[t.name for t in cfg.reward.terms()]} epochs={cfg.train.epochs}"
    )
    return 0


def cmd_estimate_memory(args: argparse.Namespace) -> int:
    from advantageflow.memory_estimate import estimate_memory

    cfg = _load(args.items)
    if args.world_size < 1:
        from advantageflow.configbase import ConfigError

        raise ConfigError("--world-size must be >= 1")
    estimate = estimate_memory(cfg, arch_name=args.arch, world_size=args.world_size)
    print(json.dumps(estimate.to_dict(), indent=1) if args.json else "\n".join(estimate.lines()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from advantageflow.evaluation import evaluate_policy

    items = list(args.items)
    if args.task:
        items.append(f"task.name={args.task}")
    cfg, ckpt = _config_for_checkpoint(items, args.checkpoint, args.trust_config)
    parts = _load_policy(cfg, ckpt)
    result = evaluate_policy(parts.policy, parts.task, parts.reward, cfg)
    guards = parts.task.guards(parts.policy, result)
    report = {"checkpoint": str(ckpt) if ckpt else None, "metrics": result.metrics, "guards": guards}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(len(k) for k in {**result.metrics, **guards})
        for key, value in {**result.metrics, **guards}.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Write ``--num`` images of ``--prompt``: evaluation samples ``--index`` onwards, so image
    ``k`` is the evaluation's sample ``index + k`` had its slot this prompt (same noise key,
    sampler and seed: the run's ``seed`` unless ``--seed``)."""
    import torch

    from advantageflow.evaluation import generate_eval_samples
    from advantageflow.rollouts import SamplingSpec, decode_samples
    from advantageflow.runlog import save_samples
    from advantageflow.tasks.base import Prompt

    if args.num < 1 or args.index < 0:
        from advantageflow.configbase import ConfigError

        raise ConfigError(f"--num must be >= 1 and --index >= 0 (got {args.num} and {args.index})")
    cfg, ckpt = _config_for_checkpoint(args.items, args.checkpoint, args.trust_config)
    parts = _load_policy(cfg, ckpt)
    policy = parts.policy
    spec = SamplingSpec.for_evaluation(policy, cfg.sampler, args.steps or None)
    indices = list(range(args.index, args.index + args.num))
    seed = cfg.seed if args.seed is None else args.seed
    with torch.no_grad():
        rollout = generate_eval_samples(
            policy, [Prompt(args.prompt)] * args.num, indices, seed, spec, cfg.eval.samples_per_prompt
        )
        images = decode_samples(policy, rollout.x0, spec.chunk)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = save_samples(images, out_dir / "grid.png", title=args.prompt[:60])
    if images.dim() == 4:
        from PIL import Image

        for i, img in enumerate(images):
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr).save(out_dir / f"sample_{i:03d}.png")
    print(f"[advantageflow] wrote {args.num} samples to {out_dir} ({grid_path.name})")
    if args.export_lora:
        from advantageflow.models.export import export_lora

        export_lora(policy, args.export_lora)
        print(f"[advantageflow] LoRA in diffusers format: {args.export_lora} (pipeline.load_lora_weights)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.what != "shapes":
        from advantageflow.configbase import ConfigError

        raise ConfigError(f"unknown pretraining target '{args.what}' (known: shapes)")
    from advantageflow.numerics import thread_invariant_kernels
    from advantageflow.tasks.shapes.pretrain import main as pretrain_main

    # pretrained weights must not depend on the thread count (oneDNN off; GroupNorm: models/fixed_split.py)
    with thread_invariant_kernels():
        return int(pretrain_main(args.rest) or 0)


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from advantageflow.rewards.server import main as serve_main

    return int(serve_main([args.name, *args.rest]) or 0)


def cmd_convert_reward(args: argparse.Namespace) -> int:
    from advantageflow.rewards.convert import main as convert_main

    return int(convert_main([args.kind, *args.rest]) or 0)


def configs_dir() -> Path:
    """The shipped example configs: ``advantageflow/_configs`` in an installed wheel (setup.py
    copies them in), else the source checkout's (or editable install's) ``configs/``."""
    here = Path(__file__).resolve().parent
    for folder in (here / "_configs", here.parent / "configs"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no shipped configs next to '{here}' (neither _configs/ nor ../configs/)")


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the shipped configs, by name (the file name without ``.yaml``)."""
    return {p.stem: p for p in sorted(configs_dir().glob("*.yaml"))}


def _pick_configs(names: list[str], shipped: dict[str, Path]) -> list[Path]:
    from advantageflow.configbase import ConfigError
    from advantageflow.registry import closest

    picked = []
    for name in names:
        stem = name.removesuffix(".yaml")
        if stem not in shipped:
            near = closest(stem, list(shipped))
            hint = f"; did you mean '{near}'?" if near else " (list them: advantageflow configs)"
            raise ConfigError(f"no shipped config '{name}'{hint}")
        picked.append(shipped[stem])
    return picked


def _first_comment(path: Path) -> str:
    line = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return line.lstrip("#").strip() if line.startswith("#") else ""


def cmd_configs(args: argparse.Namespace) -> int:
    """List the shipped configs; with NAME print one; with ``--to DIR`` copy NAMEs (none: all)."""
    from advantageflow.configbase import ConfigError

    shipped = shipped_configs()
    if args.to is None and not args.names:
        width = max((len(name) for name in shipped), default=0)
        for name, path in shipped.items():
            print(f"{name:<{width}}  {_first_comment(path)}")
        return 0
    picked = _pick_configs(args.names, shipped) if args.names else list(shipped.values())
    if args.to is None:
        for path in picked:
            sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    out = Path(args.to)
    clash = [str(out / p.name) for p in picked if (out / p.name).exists()]
    if clash and not args.force:  # checked before writing anything: all or nothing
        raise ConfigError(f"'{clash[0]}' exists (--force overwrites)")
    out.mkdir(parents=True, exist_ok=True)
    for path in picked:
        (out / path.name).write_bytes(path.read_bytes())
    print(f"[advantageflow] copied {len(picked)} config(s) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from advantageflow import __version__

    parser = argparse.ArgumentParser(
        prog="advantageflow",
        allow_abbrev=False,
        description="Online RL fine-tuning of flow-matching image generators (AdvantageFlow, AWM, Flow-GRPO, "
        "DiffusionNFT, EPG, RAM, DRaFT).",
        epilog="Bad input ends with one line on stderr and exit status 2, a failure while running with one "
        "line and exit status 1.",
    )
    parser.add_argument("--version", action="version", version=f"advantageflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    trust_help = "import the code a run folder's config names (package.module:callable); only for folders you trust"

    p = sub.add_parser(
        "train", help="train (no CONFIG: the main job, AdvantageFlow on the default task)", allow_abbrev=False
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]", help="YAML config and dotted overrides")
    p.add_argument("--run-dir", help="run folder (default runs/ALGO-TASK-TIME)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's newest intact checkpoint (no CONFIG: the config it recorded)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although keys that change the maths or the model differ from the checkpoint's",
    )
    p.add_argument("--trust-config", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config (and overrides) without running", allow_abbrev=False)
    p.add_argument("items", nargs="*", metavar="CONFIG [key=value]")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "estimate-memory",
        allow_abbrev=False,
        help="peak memory per process of the config's training step, computed without weights (meta / fake tensors)",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG [key=value]")
    p.add_argument(
        "--arch",
        default="",
        metavar="NAME",
        help="a shipped architecture instead of model.path's: sd3.5-medium, flux.1-dev, qwen-image",
    )
    p.add_argument("--world-size", type=int, default=1, help="processes sharing each epoch's rollouts (DDP)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate_memory)

    p = sub.add_parser("eval", help="evaluate the base model or a checkpoint on held-out prompts", allow_abbrev=False)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]")
    p.add_argument("--checkpoint", help="checkpoint folder or run folder (its newest intact checkpoint)")
    p.add_argument("--trust-config", action="store_true", help=trust_help)
    p.add_argument("--task", help="task name (e.g. shapes); default: the config's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="write images from the base model or a checkpoint", allow_abbrev=False)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]")
    p.add_argument("--checkpoint", help="checkpoint folder or run folder")
    p.add_argument("--trust-config", action="store_true", help=trust_help)
    p.add_argument("--prompt", default="", help="the prompt")
    p.add_argument("--num", type=int, default=8, help="number of samples")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default sampler.eval_steps)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the config's seed, as evaluation)")
    p.add_argument(
        "--index",
        type=int,
        default=0,
        help="evaluation sample index of the first image (image k: the noise of evaluation sample index+k)",
    )
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--export-lora", metavar="DIR", help="also save the LoRA in diffusers' format (diffusers models)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("pretrain", help="pretrain a shipped base model (shapes)", allow_abbrev=False)
    p.add_argument("what", help="what to pretrain: shapes")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its options (see: advantageflow pretrain shapes --help)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("serve-reward", help="serve a registered reward over HTTP", allow_abbrev=False)
    p.add_argument("name", help="registered reward name or dotted path")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="server options (--host, --port, --token, ...)")
    p.set_defaults(func=cmd_serve_reward)

    p = sub.add_parser(
        "convert-reward", help="convert an official HPSv2 / ImageReward checkpoint for the rewards", allow_abbrev=False
    )
    p.add_argument("kind", choices=["hpsv2", "imagereward"], help="whose checkpoint")
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="CHECKPOINT OUT and options (see: advantageflow convert-reward hpsv2 --help)",
    )
    p.set_defaults(func=cmd_convert_reward)

    p = sub.add_parser(
        "configs", help="list the shipped example configs, print one, or copy them to a folder", allow_abbrev=False
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="config name(s) (as listed; .yaml optional)")
    p.add_argument("--to", metavar="DIR", help="copy NAME(s) into DIR (no NAME: all of them)")
    p.add_argument("--force", action="store_true", help="overwrite files already in DIR")
    p.set_defaults(func=cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Overrides may come before or after --options; the pass-through commands keep theirs raw.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "items")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.items = [*args.items, *extra]
    previous = _install_sigterm()
    # large activations reuse freed memory instead of page-faulting fresh mappings (cpu_memory.py)
    reuse_freed_memory()
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`advantageflow configs | head`): stop quietly, as Unix tools do;
        # stdout goes to /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"\n[advantageflow] {what}; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except _usage_errors() as err:
        print(f"advantageflow: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except _runtime_errors() as err:
        print(f"advantageflow: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _install_sigterm():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, _raise)


if __name__ == "__main__":
    sys.exit(main())
