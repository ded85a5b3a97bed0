"""Long-run stability on the 2-D task: configs x seeds x learning-rate multipliers.

Each cell trains ``configs/toy2d_<algo>.yaml`` (plus a variant's overrides) for ``--epochs``
epochs through the trainer's Python API (one torch thread), evaluating the held-out
rewarded fraction every ``--eval-every`` epochs, and records:

- final / best held-out value, the lowest value after the best (``min_after``) and
  ``drop = best - min_after``;
- the first epoch with a non-finite logged value or a skipped (non-finite) update, and whether
  the trainer stopped the run;
- ``stable``: ran every epoch, nothing non-finite, ``drop <= --max-drop`` (0.05).

A variant is ``name=algo:key=value;key=value`` (``--variant``, repeatable) or one of
:data:`VARIANTS`; a plain algorithm name is its shipped config.  Cells are appended to
``<out>.jsonl`` as they finish (an interrupted grid keeps its cells and ``--resume`` skips them);
the table goes to ``<out>.md``.

    python benchmarks/stability.py --configs advantageflow,af_paper --seeds 0,1,2 \\
        --lr-factors 0.3,1,3 --epochs 1000 --out benchmarks/results/stability_toy2d
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    command_line,
    git_commit,
    machine_line,
    markdown_table,
    set_threads,
    train_with_budget,
)

METRIC = "eval/rewarded_fraction"
_PAPER = ["advantageflow.adaptive_weight=true", "advantageflow.target_radius=0", "advantageflow.negative_scale=1",
          "advantageflow.gamma=1.1", "advantageflow.lambda_ref=0.001", "advantageflow.old_policy=epoch"]
# Named AdvantageFlow variants: the paper's loss as MeanFlowAdvantage quotes it, and one change each.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "af_paper": ("advantageflow", _PAPER),
    "af_no_adaptive": ("advantageflow", [*_PAPER, "advantageflow.adaptive_weight=false"]),
    "af_ema": ("advantageflow", [*_PAPER, "advantageflow.old_policy=ema"]),
    "af_gamma2": ("advantageflow", [*_PAPER, "advantageflow.gamma=2.0"]),
    "af_lambda0.1": ("advantageflow", [*_PAPER, "advantageflow.lambda_ref=0.1"]),
    "af_neg0.5": ("advantageflow", [*_PAPER, "advantageflow.negative_scale=0.5"]),
    "af_neg0": ("advantageflow", [*_PAPER, "advantageflow.negative_scale=0"]),
    "af_radius0.1": ("advantageflow", [*_PAPER, "advantageflow.target_radius=0.1"]),
    "af_radius0.3": ("advantageflow", [*_PAPER, "advantageflow.target_radius=0.3"]),
    "af_radius0.1_no_adaptive": ("advantageflow", [*_PAPER, "advantageflow.target_radius=0.1",
                                                   "advantageflow.adaptive_weight=false"]),
}


# The per-algorithm flow-matching fit (docs/metrics.md); results saved before the rename
# logged it as "stats/fm_mse".
FIT_KEYS = ("stats/x0_mse", "stats/velocity_mse", "stats/fm_mse")

@dataclass
class Cell:
    """One run's outcome (see the module docstring)."""

    config: str
    algo: str
    seed: int
    lr_factor: float
    lr: float
    epochs_asked: int
    epochs_run: int = 0
    ended: str = ""
    evals: list[tuple[int, float]] = field(default_factory=list)
    final: float = math.nan
    best: float = math.nan
    best_epoch: int = -1
    min_after: float = math.nan
    drop: float = math.nan
    first_nonfinite_epoch: int | None = None
    max_fm_mse: float = math.nan  # the largest flow-matching fit logged (FIT_KEYS)
    stable: bool = False
    seconds: float = 0.0


def resolve(name: str, extra_variants: dict[str, tuple[str, list[str]]]) -> tuple[str, list[str]]:
    """``(algo, overrides)`` of a config name: a variant, or an algorithm's shipped config."""
    if name in extra_variants:
        return extra_variants[name]
    if name in VARIANTS:
        return VARIANTS[name]
    return name, []


def parse_variant(text: str) -> tuple[str, tuple[str, list[str]]]:
    """``name=algo:key=value;key=value`` -> ``(name, (algo, overrides))``."""
    name, _, rest = text.partition("=")
    algo, _, sets = rest.partition(":")
    if not name or not algo:
        raise SystemExit(f"stability: --variant '{text}' is not name=algo:key=value;...")
    return name, (algo, [s for s in sets.split(";") if s])


def _finite(value) -> bool:
    """The logger writes non-finite floats as the strings ``nan`` / ``inf`` / ``-inf``."""
    if isinstance(value, str):
        return value not in ("nan", "inf", "-inf")
    return not isinstance(value, float) or math.isfinite(value)


def _finite_row(row: dict) -> bool:
    return all(_finite(v) for v in row.values()) and "stats/skipped_updates" not in row


def summarize(cell: Cell, rows: list[dict], max_drop: float) -> Cell:
    """Fill ``cell``'s outcome from the run's ``metrics.jsonl`` rows."""
    cell.epochs_run = max((int(r["epoch"]) for r in rows if "perf/epoch_s" in r), default=0)
    cell.evals = [(int(r["epoch"]), float(r[METRIC])) for r in rows if METRIC in r]
    bad = [int(r["epoch"]) for r in rows if not _finite_row(r)]
    cell.first_nonfinite_epoch = min(bad) if bad else None
    mses = [float(r[key]) for r in rows for key in FIT_KEYS if key in r]
    cell.max_fm_mse = max(mses) if mses else math.nan
    values = [v for _, v in cell.evals]
    if values:
        finite = [v if math.isfinite(v) else -math.inf for v in values]
        k = max(range(len(finite)), key=lambda i: finite[i])
        cell.final, cell.best, cell.best_epoch = values[-1], values[k], cell.evals[k][0]
        cell.min_after = min(finite[k:])
        cell.drop = cell.best - cell.min_after
    cell.stable = (cell.epochs_run >= cell.epochs_asked and cell.first_nonfinite_epoch is None
                   and math.isfinite(cell.drop) and cell.drop <= max_drop)
    return cell


def run_cell(name: str, algo: str, overrides: list[str], seed: int, factor: float, epochs: int, eval_every: int,
             work: Path, max_drop: float) -> Cell:
    """Train one cell for ``epochs`` epochs and summarise it."""
    from benchmarks.convergence import TASKS, build

    spec = TASKS["toy2d"]
    base_lr = build("toy2d", algo, seed, None, spec, work, overrides).train.lr
    run_dir = work / f"{name}_seed{seed}_x{factor}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*overrides, f"train.epochs={epochs}", f"eval.every={eval_every}"]
    cfg = build("toy2d", algo, seed, base_lr * factor, spec, run_dir, sets)
    t0 = time.perf_counter()
    try:
        ended = train_with_budget(cfg, run_dir, math.inf)
    except Exception as err:  # noqa: BLE001 - e.g. the trainer's final report on a non-finite metric
        ended = f"crashed after training: {type(err).__name__}: {err}"
    cell = Cell(name, algo, seed, factor, cfg.train.lr, epochs, ended=ended)
    cell.seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(run_dir, ignore_errors=True)
    return summarize(cell, rows, max_drop)


DIAGNOSTIC_PANELS = [
    ("held-out rewarded fraction", [(METRIC, "")], False),
    ("||f - x0||^2 by advantage sign", [("stats/fit_neg", "A < 0"), ("stats/fit_pos", "A > 0")], True),
    ("||f - x0||^2 by time", [("stats/fit_small_t", "t < 0.5"), ("stats/fit_large_t", "t >= 0.5")], True),
    ("max |x0| of the rollouts", [("stats/x0_absmax", "")], True),
    ("rms(f - f_old) after 1st update", [("stats/old_drift_neg", "A < 0"), ("stats/old_drift_pos", "A > 0")], True),
    ("step to per-sample target, A < 0", [("stats/neg_target_step", "")], True),
    ("adaptive weight 1/mean|f - x0|", [("stats/weight_min", "min"), ("stats/weight_max", "max")], True),
    ("grad norm (before clip)", [("stats/grad_norm", "")], True),
]


def diagnose(names: list[str], extra: dict, seed: int, factor: float, epochs: int, eval_every: int,
             png: Path, work: Path) -> dict[str, list[dict]]:
    """Run each config once (same seed) keeping its metrics, and plot the ``stats/...`` diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.convergence import TASKS, build

    runs: dict[str, list[dict]] = {}
    for name in names:
        algo, overrides = resolve(name, extra)
        base_lr = build("toy2d", algo, seed, None, TASKS["toy2d"], work, overrides).train.lr
        run_dir = work / f"diag_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = build("toy2d", algo, seed, base_lr * factor, TASKS["toy2d"], run_dir,
                    [*overrides, f"train.epochs={epochs}", f"eval.every={eval_every}",
                     *(["advantageflow.diagnostics=true"] if algo == "advantageflow" else [])])
        try:
            ended = train_with_budget(cfg, run_dir, math.inf)
        except Exception as err:  # noqa: BLE001 - see run_cell
            ended = f"crashed after training: {err}"
        runs[name] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        print(f"[stability] diagnose {name}: {ended}", flush=True)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    styles = ["-", "--", ":"]
    for ax, (title, series, log) in zip(axes.flat, DIAGNOSTIC_PANELS):
        for (name, rows), style in zip(runs.items(), styles):
            for k, (key, label) in enumerate(series):
                pts = [(r["epoch"], float(r[key])) for r in rows if key in r and _finite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{k}", lw=1.2,
                            label=f"{name}" + (f", {label}" if label else ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"AdvantageFlow on the 2-D task, seed {seed}, lr x{factor:g}: solid = {names[0]}"
                 + (f", dashed = {names[1]}" if len(names) > 1 else ""), fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    return runs


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def table(cells: list[dict]) -> str:
    """One row per (config, lr factor): per-seed outcomes and how many seeds are stable."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["config"], c["lr_factor"]), []).append(c)
    rows = []
    for (name, factor), cs in groups.items():
        cs = sorted(cs, key=lambda c: c["seed"])
        def per_seed(key, cs=cs):
            return " / ".join(_fmt(c[key]) for c in cs)
        rows.append([
            name, f"x{factor:g}", " ".join(str(c["seed"]) for c in cs), f"{sum(c['stable'] for c in cs)}/{len(cs)}",
            per_seed("final"), per_seed("best"), per_seed("min_after"),
            " / ".join(str(c["first_nonfinite_epoch"]) if c["first_nonfinite_epoch"] is not None else "-" for c in cs),
            " / ".join(str(c["epochs_run"]) for c in cs),
        ])
    header = ["config", "lr", "seeds", "stable", "final", "best", "min after best", "first non-finite epoch",
              "epochs run"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="advantageflow",
                    help=f"comma list of algorithms (shipped configs) or variants {sorted(VARIANTS)}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ALGO:KEY=VALUE;...")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--lr-factors", default="0.3,1,3")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--max-drop", type=float, default=0.05)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    ap.add_argument("--out", default=str(RESULTS / "stability_toy2d"), help="output stem (.jsonl cells, .md table)")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in <out>.jsonl")
    ap.add_argument("--table-only", action="store_true", help="re-render <out>.md from <out>.jsonl")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--diagnose", default=None, metavar="PNG",
                    help="instead of the grid: run --configs once each (first seed and lr factor) and plot "
                         "their stats/ diagnostics into PNG (rows: benchmarks/results/stability_diagnostics.json)")
    args = ap.parse_args(argv)
    if args.diagnose:
        set_threads(1)
        work = Path(tempfile.mkdtemp(prefix="af_diag_"))
        runs = diagnose([n for n in args.configs.split(",") if n], dict(parse_variant(v) for v in args.variant),
                        int(args.seeds.split(",")[0]), float(args.lr_factors.split(",")[0]), args.epochs,
                        args.eval_every, Path(args.diagnose), work)
        with open(RESULTS / "stability_diagnostics.json", "w", encoding="utf-8") as fh:
            json.dump({"command": command_line(), "commit": git_commit(), "runs": runs}, fh)
        shutil.rmtree(work, ignore_errors=True)
        return 0
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cells_path = stem.with_suffix(".jsonl")
    extra = dict(parse_variant(v) for v in args.variant)
    names = [n for n in args.configs.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [float(f) for f in args.lr_factors.split(",")]
    done: list[dict] = []
    if (args.resume or args.table_only) and cells_path.exists():
        done = [json.loads(x) for x in cells_path.read_text().splitlines() if x.strip() and not x.startswith("#")]
    elif not args.table_only:
        cells_path.write_text("")
    if not args.table_only:
        set_threads(1)
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="af_stab_"))
        header = {"command": command_line(), "commit": git_commit(), "machine": machine_line(),
                  "epochs": args.epochs, "eval_every": args.eval_every, "max_drop": args.max_drop}
        with open(cells_path, "a", encoding="utf-8") as fh:
            fh.write("# " + json.dumps(header) + "\n")
        have = {(c["config"], c["seed"], c["lr_factor"], c["epochs_asked"]) for c in done}
        # Seed-major order: a partial grid has every config on the first seeds.
        for seed in seeds:
            for factor in factors:
                for name in names:
                    if (name, seed, factor, args.epochs) in have:
                        continue
                    algo, overrides = resolve(name, extra)
                    cell = run_cell(name, algo, [*overrides, *args.set], seed, factor, args.epochs,
                                    args.eval_every, work, args.max_drop)
                    print(f"[stability] {name:24s} seed {seed} lr x{factor:g}: {cell.epochs_run} epochs, "
                          f"final {_fmt(cell.final)} best {_fmt(cell.best)} (epoch {cell.best_epoch}) "
                          f"min-after {_fmt(cell.min_after)}, non-finite at {cell.first_nonfinite_epoch}, "
                          f"{'stable' if cell.stable else 'UNSTABLE'}, {cell.seconds:.0f}s", flush=True)
                    with open(cells_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(asdict(cell)) + "\n")
                    done.append(asdict(cell))
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = (f"Stability on the 2-D task: held-out `{METRIC}` (1024 samples) every eval; per-seed values "
            f"(seeds in the order listed). `stable` = all epochs run, no non-finite value, and the lowest "
            f"value after the best within {args.max_drop} of the best.\n\n" + table(done) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
