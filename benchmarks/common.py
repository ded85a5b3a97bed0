"""Shared pieces of the benchmarks: machine description, budgeted training runs, curves, tables.

The trainer has no wall-clock budget option, so :func:`train_with_budget` runs
:func:`advantageflow.trainer.train` in-process with a metrics logger that stops the run (by
raising :class:`BudgetReached` right after writing the epoch's row) once the summed training
time of the epochs (``perf/epoch_s``: rollouts + rewards + updates, evaluation excluded)
reaches the budget.  Everything the benchmark reads comes from the run's ``metrics.jsonl``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class BudgetReached(Exception):
    """Raised by :class:`_BudgetLogger` to end a run whose training time is spent."""


def machine_line() -> str:
    """One line naming the machine: CPU model, cores, torch version, load average."""
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
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch "
            f"thread(s), load average {load} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def train_with_budget(cfg: Any, run_dir: Path, budget_s: float) -> str:
    """Train ``cfg`` into ``run_dir`` until ``train.epochs`` or ``budget_s`` seconds of training.

    When the budget ends the run on an epoch without evaluation, the final policy is evaluated
    here (same evaluation as the trainer's) and the row appended to ``metrics.jsonl``.
    Returns how the run ended: ``"budget"``, ``"epochs"``, or ``"stopped: <reason>"`` when the
    trainer gave up (e.g. non-finite losses); the rows logged until then stay usable.  The
    budget counts ``perf/epoch_s`` only, so held-out evaluation (which every method pays
    equally) does not eat into it.
    """
    from advantageflow import trainer
    from advantageflow.evaluation import evaluate_policy
    from advantageflow.runlog import MetricsLogger

    built = {}

    def _build(*args, **kwargs):  # keep the run's policy, task and reward for the final evaluation
        built["parts"] = original_build(*args, **kwargs)
        return built["parts"]

    original_build = trainer.build_components

    class _BudgetLogger(MetricsLogger):
        spent = 0.0

        def log(self, step: int, metrics: dict[str, Any]) -> None:
            super().log(step, metrics)
            self.spent += float(metrics.get("perf/epoch_s", 0.0))
            if self.spent >= budget_s:
                raise BudgetReached(f"{self.spent:.1f}s")

    try:
        with mock.patch.object(trainer, "MetricsLogger", _BudgetLogger), \
                mock.patch.object(trainer, "build_components", _build):
            trainer.train(cfg, run_dir)
    except BudgetReached:
        # The budget ended the run between two evaluations: evaluate the final policy too.
        path = Path(run_dir) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if rows and not any(k.startswith("eval/") for k in rows[-1]):
            parts = built["parts"]
            trainer.policy_eval_mode(parts.policy, True)
            result = evaluate_policy(parts.policy, parts.task, parts.reward, cfg)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": rows[-1].get("step", 0), "epoch": rows[-1].get("epoch", 0),
                                     "samples": rows[-1].get("samples", 0), "budget_end_eval": True,
                                     **result.metrics}) + "\n")
        return "budget"
    except trainer.TrainingError as err:
        return f"stopped: {str(err).split(';')[0]}"
    return "epochs"


@dataclass
class Curve:
    """Held-out metric of one run against cumulative training seconds and samples.

    Attributes: seconds, samples, values: equal-length lists, one entry per evaluation
    (the first is the base model at 0 s, 0 samples).  epoch_s: mean seconds per epoch.
    """

    seconds: list[float]
    samples: list[int]
    values: list[float]
    epoch_s: float
    epochs: int
    ended: str = ""


def read_curve(run_dir: Path, metric: str) -> Curve:
    """Parse ``metrics.jsonl``: cumulative ``perf/epoch_s`` and ``samples`` at each eval row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, samples, values, spent, epoch_times = [], [], [], 0.0, []
    for row in rows:
        if "perf/epoch_s" in row:
            spent += row["perf/epoch_s"]
            epoch_times.append(row["perf/epoch_s"])
        if metric in row:
            seconds.append(spent)
            samples.append(int(row.get("samples", 0)))
            values.append(float(row[metric]))
    if not values:
        raise ValueError(f"no '{metric}' in {run_dir / 'metrics.jsonl'}")
    return Curve(seconds, samples, values, statistics.fmean(epoch_times) if epoch_times else math.nan,
                 len(epoch_times))


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


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
