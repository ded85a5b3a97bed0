"""Shared pieces of the benchmarks: machine description, budgeted training runs, curves, tables.

:func:`train_with_budget` runs :func:`advantageflow.trainer.train` in-process with the trainer's
own budgets: ``train.max_wall_s`` (training seconds: rollouts + rewards + updates, evaluation
excluded, the sum of ``perf/epoch_s``) and ``train.max_samples``.  The trainer ends the run at
the end of the epoch that spends a budget, with a final held-out evaluation.  Everything the
benchmark reads comes from the run's ``metrics.jsonl``, including the machine-independent cost
counters ``perf/network_rows_fwd`` / ``perf/network_rows_bwd`` / ``perf/flops``
(:mod:`advantageflow.compute`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine_line() -> str:
    """One line naming the machine: CPU model, cores, GPUs (where CUDA sees any), torch version,
    load average."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if torch.cuda.is_available():
        cpu += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch "
            f"thread(s), load average {load} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def command_line(hide: tuple[str, ...] = ()) -> str:
    """How this script was called; the values of the options in ``hide`` are printed as their names."""
    args = list(sys.argv[1:])
    for i, arg in enumerate(args):
        if arg in hide and i + 1 < len(args):
            args[i + 1] = arg.lstrip("-").upper()
        elif arg.split("=", 1)[0] in hide:
            args[i] = f"{arg.split('=', 1)[0]}={arg.split('=', 1)[0].lstrip('-').upper()}"
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *args])


def train_with_budget(cfg: Any, run_dir: Path, budget_s: float, budget_samples: int = 0) -> str:
    """Train ``cfg`` into ``run_dir`` until ``train.epochs`` or a budget: ``budget_s`` seconds of
    training (``train.max_wall_s``) or ``budget_samples`` rollout samples (``train.max_samples``);
    0 = no such budget.

    Returns how the run ended: ``"budget"`` (the trainer's ``stopped_by`` was a budget; it
    evaluated the final policy), ``"epochs"``, or ``"stopped: <reason>"`` when the trainer gave
    up (e.g. non-finite losses); the rows logged until then stay usable.
    """
    from advantageflow import trainer

    cfg.train.max_wall_s = float(budget_s)
    cfg.train.max_samples = int(budget_samples)
    cfg.train.validate()
    try:
        result = trainer.train(cfg, run_dir)
    except trainer.TrainingError as err:
        return f"stopped: {str(err).split(';')[0]}"
    return "epochs" if result.stopped_by == "epochs" else "budget"


@dataclass
class Curve:
    """Held-out metric of one run against cumulative training seconds, samples and compute.

    Attributes: seconds, samples, values: equal-length lists, one entry per evaluation
    (the first is the base model at 0 s, 0 samples).  epoch_s: mean seconds per epoch.
    rows, flops: cumulative network rows (forward + backward: ``perf/network_rows_fwd`` +
    ``perf/network_rows_bwd``) and ``perf/flops`` at each evaluation (empty for results saved
    before the trainer counted them; ``flops`` also when the model's FLOPs are not counted).
    seed: the run's seed where methods were run on different seed sets (imported runs);
    None = the curve's position in its method's list.  guard: a second held-out metric at
    each evaluation that tells a real gain from reward hacking (ShapesEval: ``eval/overdrawn``;
    empty where none was asked for or the run did not log it).
    """

    seconds: list[float]
    samples: list[int]
    values: list[float]
    epoch_s: float
    epochs: int
    ended: str = ""
    rows: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seed: int | None = None
    guard: list[float] = field(default_factory=list)


def read_curve(run_dir: Path, metric: str, guard: str = "") -> Curve:
    """Parse ``metrics.jsonl``: cumulative ``perf/epoch_s``, ``samples`` and compute counters at
    each eval row (the counters are cumulative already; the base model's row is at 0), and the
    ``guard`` metric where every eval row has it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, samples, values, spent, epoch_times = [], [], [], 0.0, []
    net_rows, flops, guards = [], [], []
    for row in rows:
        if "perf/epoch_s" in row:
            spent += row["perf/epoch_s"]
            epoch_times.append(row["perf/epoch_s"])
        if metric in row:
            seconds.append(spent)
            samples.append(int(row.get("samples", 0)))
            values.append(float(row[metric]))
            net_rows.append(float(row.get("perf/network_rows_fwd", 0) + row.get("perf/network_rows_bwd", 0)))
            flops.append(float(row["perf/flops"]) if "perf/flops" in row else math.nan)
            guards.append(float(row.get(guard, math.nan)) if guard else math.nan)
    if not values:
        raise ValueError(f"no '{metric}' in {run_dir / 'metrics.jsonl'}")
    if any(math.isnan(f) for f in flops[1:]):
        flops = []
    else:
        flops[0] = 0.0
    return Curve(seconds, samples, values, statistics.fmean(epoch_times) if epoch_times else math.nan,
                 len(epoch_times), rows=net_rows, flops=flops,
                 guard=[] if any(math.isnan(g) for g in guards) else guards)


def first_crossing(xs: list[float], values: list[float], target: float) -> float | None:
    """The first ``x`` whose value reaches ``target`` (at evaluation resolution), else None."""
    for x, v in zip(xs, values):
        if v >= target:
            return x
    return None


def step_interp(xs: list[float], values: list[float], grid: list[float]) -> list[float]:
    """Last evaluated value at or before each grid point (NaN after the run ended)."""
    out, j = [], 0
    for g in grid:
        while j + 1 < len(xs) and xs[j + 1] <= g:
            j += 1
        out.append(values[j] if g <= xs[-1] + 1e-9 else math.nan)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up (the least disturbed on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def write_report(stem: str, lines: list[str]) -> str:
    """``lines`` below one line naming the command, the commit and the machine: written to
    ``STEM.md``, printed, returned."""
    text = "\n".join([f"`{command_line()}` at commit {git_commit()}; {machine_line()}", "", *lines]) + "\n"
    Path(stem + ".md").write_text(text)
    print(text)
    return text
