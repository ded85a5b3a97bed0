"""``scripts/gpu_check.sh`` / ``python -m advantageflow.gpu_check``: the one command to run
the first time a GPU is available.

With a CUDA device it trains the tiny SD3, FLUX.1, FLUX.1 Kontext, FLUX.2 and Wan pipelines
(built in-process from configs, no download) with every algorithm for ``--epochs`` epochs in
the GPU precision the real configs use (frozen weights in bf16, LoRA and losses in float32),
initialises NCCL, runs a two-process ``torchrun`` job when two GPUs exist, and prints one
table: seconds per epoch, peak GPU memory, final loss, ok or the error.  Without CUDA it says so and exits 0.
``--device cpu`` runs the same matrix on the CPU in float32 (what the tests do).

The reward is the images' mean brightness, registered here: differentiable (DRaFT needs one)
and free of weights, so the check needs nothing but the package.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "_configs"
if not CONFIGS.is_dir():  # a source checkout: the repository's configs/
    CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = ("sd3", "flux", "qwen_image", "sana", "flux_kontext", "flux2", "wan")
ALGOS = ("advantageflow", "awm", "flow_grpo", "diffusion_nft", "epg", "ram", "draft")
REWARD = "gpu_check_brightness"


class MeanBrightness:
    """``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(B,)`` mean pixel value; keeps the graph."""

    differentiable = True
    builds_cheaply = True

    def __init__(self, **_: object) -> None:
        pass

    def __call__(self, images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))


def _register_reward() -> None:
    from advantageflow.rewards import REWARDS

    if REWARD not in REWARDS:
        REWARDS.register(REWARD, MeanBrightness)


@dataclass
class CheckRow:
    """One line of the table."""

    model: str
    algo: str
    precision: str
    s_per_epoch: float = float("nan")  # training only (the trainer's wall_s over epochs)
    s_total: float = float("nan")  # with building the pipeline
    peak_mib: float = float("nan")
    final_loss: float = float("nan")
    error: str = ""


def overrides(model: str, algo: str, device: str, epochs: int) -> list[str]:
    """The tiny config's overrides for one cell: a few small updates, no evaluation."""
    return [
        f"algo={algo}", f"device={device}", f"model.path=tiny:{model}", f"reward.name={REWARD}",
        f"train.epochs={epochs}", "eval.every=0", f"checkpoint.every={epochs}", "log.tensorboard=false",
        "log.progress=false",
    ]


def _peak_mib(device: str, rss_before: int) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # the CPU: growth of the process's peak resident set (KiB on Linux)
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024


def run_cell(model: str, algo: str, device: str, epochs: int, work: Path) -> CheckRow:
    """Train one (model, algorithm) cell; errors are caught into the row."""
    from advantageflow.config import load_config
    from advantageflow.runlog import read_metrics
    from advantageflow.trainer import train

    row = CheckRow(model, algo, "bf16 weights, fp32 LoRA" if device.startswith("cuda") else "fp32")
    try:
        cfg = load_config(str(CONFIGS / f"{model}_tiny_advantageflow.yaml"), overrides(model, algo, device, epochs))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = train(cfg, work / f"{model}-{algo}")
        row.s_total = time.perf_counter() - start
        row.s_per_epoch = result.wall_s / max(result.epochs, 1)
        row.peak_mib = _peak_mib(device, rss)
        losses = [r["loss/total"] for r in read_metrics(Path(result.run_dir) / "metrics.jsonl") if "loss/total" in r]
        row.final_loss = losses[-1] if losses else float("nan")
        if not losses or not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
            row.error = "no finite loss"
    except Exception as err:  # the table reports every failure; the exit code says if any
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return row


def nccl_check() -> str:
    """Initialise a one-process NCCL group and all-reduce one tensor: 'ok' or the error."""
    import torch.distributed as dist

    try:
        store = dist.HashStore()
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.destroy_process_group()
        return "ok" if float(x.sum()) == 4.0 else f"all_reduce gave {x.tolist()}"
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def two_process_check(work: Path, epochs: int) -> str:
    """``torchrun --nproc-per-node 2`` on the tiny SD3 pipeline (one GPU each): 'ok' or the error."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "advantageflow", "train",
           str(CONFIGS / "sd3_tiny_advantageflow.yaml"), *overrides("sd3", "advantageflow", "cuda", epochs),
           "--run-dir", str(work / "two-gpus")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": "."})
    return "ok" if out.returncode == 0 else (out.stderr.strip().splitlines() or ["failed"])[-1][:200]


def table(rows: list[CheckRow]) -> str:
    """The markdown table of the rows."""
    lines = ["| model | algorithm | precision | s / epoch | s in all | peak MiB | final loss | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = r.error or "ok"
        lines.append(f"| {r.model} | {r.algo} | {r.precision} | {r.s_per_epoch:.2f} | {r.s_total:.1f} | "
                     f"{r.peak_mib:.0f} | {r.final_loss:.4g} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (float32, what the tests run)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine, or --device cpu)")
        return 0
    _register_reward()
    lines = []
    if args.device.startswith("cuda"):
        lines.append(f"device: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}")
        lines.append(f"NCCL, one process: {nccl_check()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="af-gpu-check-") as tmp:
        for model in args.models.split(","):
            for algo in args.algos.split(","):
                rows.append(run_cell(model, algo, args.device, args.epochs, Path(tmp)))
                print(f"gpu_check: {model} / {algo}: {rows[-1].error or 'ok'}", flush=True)
        if args.device.startswith("cuda"):
            two = two_process_check(Path(tmp), args.epochs) if torch.cuda.device_count() >= 2 else "skipped (one GPU)"
            lines.append(f"two processes (torchrun, NCCL): {two}")
    report = "\n".join([*lines, "", table(rows)])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
