"""Who reaches the target first: every algorithm from the same base model, same prompts and seeds.

For each method the benchmark (1) spends an equal, declared tuning budget: the same learning
rate sweep (``--lr-factors`` times the method's own config lr) on a tuning seed that is not
one of the reported seeds, picking the lr with the shortest time-to-target (then the best
final value); (2) trains the chosen lr on every reported seed for the same budget, the
trainer's own ``train.max_wall_s`` (training seconds: rollouts + rewards + updates; held-out
evaluation excluded) and/or ``train.max_samples`` (``--budget-samples``); (3) reads the held-out
metric from ``metrics.jsonl`` against training seconds, samples, and the machine-independent
counters ``perf/network_rows_fwd`` + ``perf/network_rows_bwd`` and ``perf/flops``, and reports
each cost-to-target as a speed-up over Flow-GRPO.

Hyper-parameters are the authors' recommendations as scaled to the CPU in
``configs/toy2d_<algo>.yaml``.  For ShapesEval the per-method configs are derived from the
main job, ``configs/shapes_advantageflow.yaml``: its model, task, reward, sampler, batch and
evaluation, with the algorithm's own section (and its advantage / steps-per-epoch convention)
taken from ``configs/toy2d_<algo>.yaml``; AdvantageFlow, whose shipped ShapesEval config is the
main job, runs the main job unchanged (six stratified draws per sample in one step, with the 2-D
task's trust region of 0.1: without it those settings fall after epoch 60).  DRaFT needs a
differentiable reward, so it runs on the 2-D task only (with its smooth reward; it is compared on the same task metric).

    python benchmarks/convergence.py --task toy2d --quick
    python benchmarks/convergence.py --task shapes --quick

Writes ``benchmarks/results/convergence_<task>[_quick].md`` (table) and ``.png`` (curves).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    ROOT,
    Curve,
    command_line,
    first_crossing,
    git_commit,
    machine_line,
    markdown_table,
    mean_std,
    read_curve,
    set_threads,
    step_interp,
    train_with_budget,
)

ALGOS = ("advantageflow", "awm", "diffusion_nft", "epg", "ram", "flow_grpo", "flow_grpo_fast", "draft")
BASELINE = "flow_grpo"
# Methods that are another preset of an algorithm: name -> (algorithm, config whose algorithm
# section is the preset).  Flow-GRPO-Fast: the authors' Fast preset (CPS, noise 0.8, an SDE
# window of 3 steps inside the first half of the grid, clip 1e-5, no KL), as shipped for SD3.5.
VARIANTS = {"flow_grpo_fast": ("flow_grpo", "configs/sd3_5m_flow_grpo_fast.yaml")}


@dataclass
class TaskSpec:
    """How one task is benchmarked.

    Attributes: metric: the held-out key compared.  target_delta: target = mean base value
    + this.  eval_every: epochs between evaluations.  extra: overrides for every run.
    guard: a held-out key reported beside the final value (lower is better), that shows a
    gain made by exploiting the reward ("" for none).
    """

    metric: str
    target_delta: float
    eval_every: int
    algos: tuple[str, ...]
    extra: list[str] = field(default_factory=list)
    guard: str = ""


TASKS = {
    # 2-D task: base puts ~0.35 of its mass on the 3 rewarded modes (of 8); the target is
    # base + 0.4, i.e. three quarters of the mass where the reward is.
    "toy2d": TaskSpec("eval/rewarded_fraction", 0.4, 3, ALGOS, ["eval.samples_per_prompt=1024"]),
    # ShapesEval v2: GenEval-style strict accuracy on the 96 held-out evaluation slots (16 per
    # tag), two samples each (192 images, 32 per tag, ~13 s on one core: se about 0.025 per
    # curve point; the main job's own evaluation uses 9 samples); target base + 0.2.
    # Guard: the share of images that draw more of a named shape than asked, which GenEval's
    # "at least" count rule rewards outside counting (docs/shapes.md, "Why counting falls").
    "shapes": TaskSpec("eval/strict", 0.2, 5, tuple(a for a in ALGOS if a != "draft"),
                       ["eval.num_prompts=96", "eval.samples_per_prompt=2"], guard="eval/overdrawn"),
}


def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def algo_config_dict(task: str, method: str) -> dict:
    """The raw config of ``method`` on ``task`` (see the module docstring for ShapesEval)."""
    algo, preset = VARIANTS.get(method, (method, None))
    own = load_yaml(ROOT / "configs" / f"toy2d_{algo}.yaml")
    if preset is not None:
        own[algo] = load_yaml(ROOT / preset)[algo]
    if task == "toy2d":
        return own
    main_path = ROOT / "configs" / "shapes_advantageflow.yaml"
    if not main_path.exists():
        raise SystemExit(f"convergence: {main_path.relative_to(ROOT)} (the ShapesEval main job) does not exist yet")
    data = load_yaml(main_path)
    main_algo = data.get("algo", "advantageflow")
    if algo == main_algo and preset is None:
        return data  # the algorithm's own shipped ShapesEval config: the main job itself
    data.pop(main_algo, None)
    data["algo"] = algo
    data[algo] = own.get(algo, {})
    # The authors' batch conventions that differ from AdvantageFlow's.
    data.setdefault("advantage", {})["std"] = own.get("advantage", {}).get("std", "global")
    data.setdefault("train", {})["steps_per_epoch"] = own["train"]["steps_per_epoch"]
    return data


def build(task: str, algo: str, seed: int, lr: float | None, spec: TaskSpec, run_dir: Path,
          extra: list[str] = ()):
    from advantageflow.config import build_config
    from advantageflow.configbase import apply_override, parse_override

    data = algo_config_dict(task, algo)
    overrides = [
        f"seed={seed}", "train.epochs=1000000", f"eval.every={spec.eval_every}", "checkpoint.every=100000000",
        "checkpoint.keep=1", "log.progress=false", "log.tensorboard=false", *spec.extra, *extra,
    ]
    if lr is not None:
        overrides.append(f"train.lr={lr}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return build_config(data)


def run_one(task: str, algo: str, seed: int, lr: float | None, spec: TaskSpec, budget_s: float,
            work: Path, keep: bool, extra: list[str] = (), budget_samples: int = 0) -> Curve:
    run_dir = work / f"{algo}_seed{seed}_lr{lr}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = build(task, algo, seed, lr, spec, run_dir, extra)
    t0 = time.perf_counter()
    ended = train_with_budget(cfg, run_dir, budget_s, budget_samples)
    curve = read_curve(run_dir, spec.metric, spec.guard)
    curve.ended = ended
    print(f"  {algo:14s} seed {seed:4d} lr {cfg.train.lr:.2e}: {curve.epochs:4d} epochs, "
          f"{spec.metric.split('/')[-1]} {curve.values[0]:.3f} -> {curve.values[-1]:.3f} "
          f"(max {max(curve.values):.3f}), {time.perf_counter() - t0:.0f}s total, ended by {ended}", flush=True)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return curve


def score_for_tuning(curve: Curve, target: float) -> tuple[bool, bool, float, float]:
    """Sort key (smaller is better): reach the target and stay there.  Runs the trainer
    stopped (non-finite losses) come last, then runs that end below the target; then the
    shortest time-to-target, then the best final value."""
    t = first_crossing(curve.seconds, curve.values, target)
    return (curve.ended.startswith("stopped"), curve.values[-1] < target, t if t is not None else math.inf,
            -curve.values[-1])


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Measure:
    """One way of counting the cost to the target: a cumulative quantity at each evaluation.

    Attributes: key: short name.  label: table heading.  xs: the curve's values of it (empty
    when the run did not record it).  digits: how to print it.
    """

    key: str
    label: str
    xs: Any
    fmt: str


MEASURES = (
    Measure("time", "time-to-target s", lambda c: c.seconds, ".1f"),
    Measure("samples", "samples-to-target", lambda c: [float(s) for s in c.samples], ".0f"),
    # Machine-independent: network rows (forward + backward) and FLOPs (advantageflow/compute.py).
    Measure("rows", "network rows-to-target", lambda c: c.rows, ".3g"),
    Measure("flops", "FLOPs-to-target", lambda c: c.flops, ".3g"),
)


def speedups(mine: dict, theirs: dict, cap: dict) -> tuple[list[float], bool]:
    """Per-seed ratio theirs / mine over the seeds both ran (``{seed: cost or None}``); a
    baseline that missed the target counts as ``cap[seed]``, the cost of its whole run on that
    seed ('>=' lower bound)."""
    out, bound = [], False
    for seed, m in mine.items():
        if m is None or seed not in theirs:
            continue
        b = theirs[seed]
        if b is None:
            b, bound = cap[seed], True
        out.append(b / max(m, 1e-9))
    return out, bound


def largest_fall(values: list[float]) -> float:
    """How far a curve ever fell below its best value so far (the stability criterion)."""
    best, fall = -math.inf, 0.0
    for v in values:
        best = max(best, v)
        fall = max(fall, best - v)
    return fall


def curve_seeds(curves: list[Curve]) -> list[int]:
    """Each curve's seed: its own where recorded (imported runs), else its position."""
    return [c.seed if c.seed is not None else i for i, c in enumerate(curves)]


def summarize(task: str, spec: TaskSpec, results: dict, lrs: dict, target: float, base: float,
              budget_s: float, seeds: list[int]) -> tuple[str, dict]:
    """Markdown table: final value, cost-to-target (time, samples, network rows, FLOPs) and the
    speed-ups over Flow-GRPO in each."""
    per = {}
    for algo, curves in results.items():
        per[algo] = {"final": [c.values[-1] for c in curves], "best": [max(c.values) for c in curves],
                     "epoch_s": [c.epoch_s for c in curves], "epochs": [c.epochs for c in curves]}
        for m in MEASURES:  # None: missed the target, or the measure was not recorded
            per[algo][m.key] = [first_crossing(m.xs(c), c.values, target) if m.xs(c) else None for c in curves]
    measures = [m for m in MEASURES if all(m.xs(c) for cs in results.values() for c in cs)]
    # the guard's final value and change, where every run logged it (results saved before it did not)
    guarded = bool(spec.guard) and all(c.guard for cs in results.values() for c in cs)

    header = ["method", "seeds", "lr (chosen)", "epochs", "s / epoch", f"final {spec.metric}", "final − base",
              f"best {spec.metric}", "largest fall below the best", "reached", "stopped early",
              *([f"final {spec.guard}", f"{spec.guard} change"] if guarded else []),
              *[m.label for m in measures],
              *[f"speed-up vs Flow-GRPO ({m.key})" for m in measures]]
    rows = []
    for algo in results:
        p = per[algo]
        reached = sum(t is not None for t in p["time"])
        cost_cells, sp_cells = [], []
        for m in measures:
            mean, std = mean_std([x for x in p[m.key] if x is not None])
            cost_cells.append("–" if math.isnan(mean) else f"{mean:{m.fmt}} ± {std:{m.fmt}}")
            if BASELINE not in results:
                sp_cells.append("–")
                continue
            base_curves = results[BASELINE]
            base_seeds = curve_seeds(base_curves)
            cap = {s: budget_s if m.key == "time" and budget_s > 0 else m.xs(c)[-1]
                   for s, c in zip(base_seeds, base_curves)}
            ratios, bound = speedups(dict(zip(curve_seeds(results[algo]), p[m.key])),
                                     dict(zip(base_seeds, per[BASELINE][m.key])), cap)
            if not ratios:
                sp_cells.append("–")
                continue
            sp_cells.append(f"{'≥' if bound else ''}{mean_std(ratios)[0]:.2f}x [{min(ratios):.2f}–{max(ratios):.2f}]")
        rows.append([
            algo, ",".join(str(s) for s in curve_seeds(results[algo])), f"{lrs[algo]:.1e}",
            f"{mean_std(p['epochs'])[0]:.0f}", f"{mean_std(p['epoch_s'])[0]:.3f}",
            fmt(*mean_std(p["final"])), fmt(*mean_std([c.values[-1] - c.values[0] for c in results[algo]])),
            fmt(*mean_std(p["best"])), f"{max(largest_fall(c.values) for c in results[algo]):.3f}",
            f"{reached}/{len(p['time'])}",
            str(sum(c.ended.startswith("stopped") for c in results[algo])),
            *([fmt(*mean_std([c.guard[-1] for c in results[algo]])),
               fmt(*mean_std([c.guard[-1] - c.guard[0] for c in results[algo]]))] if guarded else []),
            *cost_cells, *sp_cells,
        ])
    return markdown_table(header, rows), per


def plot(results: dict, spec: TaskSpec, target: float, budget_s: float, path: Path, title: str) -> None:
    """Held-out metric against training seconds, images sampled and FLOPs (network rows where
    FLOPs were not counted; the third panel is left out for results saved without either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_all = [c for cs in results.values() for c in cs]
    panels = [(MEASURES[0], "training wall-clock seconds (evaluation excluded)"), (MEASURES[1], "images sampled")]
    for m, xlabel in ((MEASURES[3], "FLOPs (forward + backward, training)"),
                      (MEASURES[2], "network rows (forward + backward, training)")):
        if all(m.xs(c) for c in curves_all):
            panels.append((m, xlabel))
            break
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for algo, curves in results.items():
        for ax, (m, _) in zip(axes, panels):
            x_max = max(m.xs(c)[-1] for c in curves)
            # the even grid plus every evaluation point, so each curve's last value is drawn
            grid = sorted({x_max * i / 400 for i in range(401)} | {float(x) for c in curves for x in m.xs(c)})
            ys = [step_interp(m.xs(c), c.values, grid) for c in curves]
            mean = [_nanmean([y[i] for y in ys]) for i in range(len(grid))]
            lo = [_nanmin([y[i] for y in ys]) for i in range(len(grid))]
            hi = [_nanmax([y[i] for y in ys]) for i in range(len(grid))]
            (line,) = ax.plot(grid, mean, label=algo)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15)
    for ax, (_, xlabel) in zip(axes, panels):
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {spec.metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (mean over seeds, band = min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nanmean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _nanmin(v):
    v = [x for x in v if not math.isnan(x)]
    return min(v) if v else math.nan


def _nanmax(v):
    v = [x for x in v if not math.isnan(x)]
    return max(v) if v else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="toy2d")
    ap.add_argument("--quick", action="store_true", help="smaller budget / fewer seeds: fits in 15 minutes")
    ap.add_argument("--seeds", type=int, default=None, help="reported seeds 0..N-1 (default 5, quick 3 / 2)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="training seconds per run (train.max_wall_s; default toy2d 10, shapes 300; --quick: 6, 100; "
                         "none when only --budget-samples is given)")
    ap.add_argument("--budget-samples", type=int, default=0,
                    help="rollout samples per run (train.max_samples): a budget that does not depend on the machine")
    ap.add_argument("--lr-factors", default=None,
                    help="comma list multiplying each config's lr: the tuning sweep (default 0.3,1,3; quick: 1)")
    ap.add_argument("--tuning-seed", type=int, default=1000)
    ap.add_argument("--algos", default=None, help="comma list (default: all that apply to the task)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--workers", type=int, default=1,
                    help="runs at a time, each in its own process (2 on a 2-core machine: all cores busy; the "
                         "compute counters, not seconds, then carry the comparison)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the finished runs recorded in <out>.runs.jsonl by an interrupted benchmark")
    ap.add_argument("--target", type=float, default=None, help="absolute target (default: base + task delta)")
    ap.add_argument("--target-delta", type=float, default=None,
                    help="target = base + this (default 0.4 on toy2d, 0.2 on shapes)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/convergence_<task>)")
    ap.add_argument("--work-dir", default=None, help="where runs are written (default: a temporary folder)")
    ap.add_argument("--keep-runs", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable)")
    ap.add_argument("--import-runs", default=None, metavar="MANIFEST",
                    help="report runs made outside the benchmark (e.g. long `advantageflow train` runs): a JSON file "
                         "{\"runs\": {method: {seed: run_dir}}, \"protocol\": how they were made}; writes "
                         "<out>.json/.md/.png like a benchmark run")
    ap.add_argument("--from-json", default=None,
                    help="re-render the table and plot of a saved run (with --target: at another target)")
    ap.add_argument("--note", default="", help="with --from-json: a sentence added under the command line "
                                                "(e.g. where the saved run ran)")
    args = ap.parse_args(argv)
    if args.import_runs:
        stem = Path(args.out) if args.out else RESULTS / f"imported_{args.task}"
        data = import_runs(Path(args.import_runs), args.task, args.target)
        with open(stem.with_suffix(".json"), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        print(write_report(data, stem))
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        note = ""
        command = command_line(hide=("--note",))  # the note itself follows the command
        if args.target is not None:
            data["target"] = args.target
            note = f" Re-rendered at target {args.target} with `{command}`."
        if args.note:
            note = (note or f" Re-rendered with `{command}`.") + f" {args.note.strip()}"
        print(write_report(data, Path(args.out) if args.out else Path(args.from_json).with_suffix(""), note))
        return 0

    spec = TASKS[args.task]
    if args.target_delta is not None:
        spec.target_delta = args.target_delta
    quick_defaults = {"toy2d": (3, 6.0), "shapes": (1, 100.0)}
    full_defaults = {"toy2d": (5, 10.0), "shapes": (3, 300.0)}
    n_seeds, budget = (quick_defaults if args.quick else full_defaults)[args.task]
    n_seeds = args.seeds or n_seeds
    budget_s = args.budget_s if args.budget_s is not None else (0.0 if args.budget_samples else budget)
    if budget_s < 0 or args.budget_samples < 0:
        raise SystemExit("convergence: --budget-s and --budget-samples must be >= 0")
    if budget_s == 0 and args.budget_samples == 0:
        raise SystemExit("convergence: give a budget: --budget-s > 0 or --budget-samples > 0")
    factors = [float(x) for x in (args.lr_factors or ("1" if args.quick else "0.3,1,3")).split(",")]
    algos = tuple(args.algos.split(",")) if args.algos else spec.algos
    unknown = [a for a in algos if a not in spec.algos]
    if unknown:
        raise SystemExit(f"convergence: {unknown} not benchmarked on {args.task} (choose from {list(spec.algos)})")
    seeds = list(range(n_seeds))
    set_threads(args.threads)
    stem = Path(args.out) if args.out else RESULTS / f"convergence_{args.task}{'_quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="af_conv_"))
    work.mkdir(parents=True, exist_ok=True)
    machine_start = machine_line()
    t_start = time.perf_counter()
    print(f"[convergence] {args.task}: {len(algos)} methods x {len(seeds)} seeds, "
          f"{budget_text(budget_s, args.budget_samples)} each, "
          f"lr sweep x{factors} on seed {args.tuning_seed}; runs in {work}", flush=True)

    # Target: mean base value over the reported seeds (the base model is shared; only the
    # held-out noise depends on the seed), read from the first method's epoch-0 evaluation.
    lrs: dict[str, float] = {}
    target = args.target
    tuning_log: list[str] = []
    data = {"task": args.task, "quick": args.quick, "budget_s": budget_s, "budget_samples": args.budget_samples,
            "seeds": seeds, "factors": factors,
            "tuning_seed": args.tuning_seed, "command": command_line(), "commit": git_commit(),
            "machine_start": machine_start, "eval_every": spec.eval_every}
    # Runs are interleaved (every method's run for one lr factor / seed, then the next), so a
    # change of load on the shared machine hits every method alike.
    ledger_path = stem.with_suffix(".runs.jsonl")
    ledger = Ledger(ledger_path, settings={
        "task": args.task, "budget_s": budget_s, "budget_samples": args.budget_samples,
        "extra": [*spec.extra, *args.set], "eval_every": spec.eval_every}, resume=args.resume)
    base_lr = {a: build(args.task, a, 0, None, spec, work, args.set).train.lr for a in algos}
    tuned: dict[str, list[tuple[float, Curve]]] = {a: [] for a in algos}

    def jobs_for(pairs: list[tuple[int, str, float]]) -> dict[tuple[int, str, float], Curve]:
        return run_jobs(pairs, args.task, spec, budget_s, args.budget_samples, work, args.keep_runs, args.set,
                        ledger, args.workers, args.threads)

    if len(factors) > 1:
        sweep = [(args.tuning_seed, algo, base_lr[algo] * f) for f in factors for algo in algos]
        done = jobs_for(sweep)
        for algo in algos:
            tuned[algo] = [(lr, done[(seed, a, lr)]) for seed, a, lr in sweep if a == algo]
        t_target = target if target is not None else tuned[algos[0]][0][1].values[0] + spec.target_delta
        for algo in algos:
            lrs[algo] = min(tuned[algo], key=lambda tc: score_for_tuning(tc[1], t_target))[0]
            tuning_log.append(f"{algo}: " + ", ".join(
                f"lr {c:.1e} -> final {cv.values[-1]:.3f}" + (" (stopped)" if cv.ended.startswith("stopped") else "")
                for c, cv in tuned[algo]) + f"; chose {lrs[algo]:.1e}")
            print(f"[convergence] tuned {tuning_log[-1]}", flush=True)
    else:
        lrs.update({a: base_lr[a] * factors[0] for a in algos})
    reported = [(seed, algo, lrs[algo]) for seed in seeds for algo in algos]
    done = jobs_for(reported)
    results = {a: [done[(seed, a, lrs[a])] for seed in seeds] for a in algos}
    t = target if target is not None else (
        sum(c.values[0] for c in results[algos[0]]) / len(seeds) + spec.target_delta)
    data.update({"target": t, "lrs": lrs, "tuning_log": tuning_log, "machine_end": machine_line(),
                 "elapsed_s": time.perf_counter() - t_start + ledger.earlier_s, "workers": args.workers,
                 "curves": {a: [vars(c) for c in cs] for a, cs in results.items()}})
    with open(stem.with_suffix(".json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    text = write_report(data, stem)
    print(text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


class Ledger:
    """Every finished run of one benchmark, one JSON line each (``<stem>.runs.jsonl``), so an
    interrupted benchmark continues where it stopped (``--resume``) instead of starting again.

    A line is reused only when the benchmark's settings (task, budgets, overrides, evaluation
    period) are those it was made with; ``--resume`` refuses a ledger made with other settings.
    """

    def __init__(self, path: Path, settings: dict, resume: bool) -> None:
        self.path, self.settings, self.runs, self.earlier_s = path, settings, {}, 0.0
        if not resume or not path.exists():
            path.write_text(json.dumps({"settings": settings}) + "\n")
            return
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines or lines[0].get("settings") != settings:
            raise SystemExit(f"convergence: {path} was made with other settings "
                             f"({lines[0].get('settings') if lines else 'empty'}); run without --resume to start again")
        for entry in lines[1:]:
            self.runs[(entry["seed"], entry["method"], entry["lr"])] = Curve(**entry["curve"])
            self.earlier_s += entry.get("wall_s", 0.0)
        print(f"[convergence] --resume: {len(self.runs)} finished run(s) read from {path}", flush=True)

    def add(self, key: tuple[int, str, float], curve: Curve, wall_s: float) -> None:
        self.runs[key] = curve
        seed, method, lr = key
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"seed": seed, "method": method, "lr": lr, "wall_s": round(wall_s, 1),
                                 "commit": git_commit(), "curve": vars(curve)}) + "\n")


def _run_job(job: tuple, threads: int) -> tuple[Curve, float]:
    """One run in a worker process (``--workers``): ``job`` = the arguments of :func:`run_one`."""
    set_threads(threads)
    t0 = time.perf_counter()
    return run_one(*job), time.perf_counter() - t0


def run_jobs(pairs: list[tuple[int, str, float]], task: str, spec: TaskSpec, budget_s: float, budget_samples: int,
             work: Path, keep: bool, extra: list[str], ledger: Ledger, workers: int,
             threads: int) -> dict[tuple[int, str, float], Curve]:
    """Run every ``(seed, method, lr)`` not in ``ledger`` (in the given order; ``workers`` at a
    time, each in its own process with ``threads`` torch threads), recording each as it ends."""
    todo = [p for p in pairs if p not in ledger.runs]
    jobs = {p: (task, p[1], p[0], p[2], spec, budget_s, work, keep, extra, budget_samples) for p in todo}
    if workers <= 1:
        for p, job in jobs.items():
            curve, wall = _run_job(job, threads)
            ledger.add(p, curve, wall)
    elif jobs:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job, threads): p for p, job in jobs.items()}
            for fut in as_completed(futures):
                curve, wall = fut.result()
                ledger.add(futures[fut], curve, wall)
    return {p: ledger.runs[p] for p in pairs}


def budget_text(budget_s: float, budget_samples: int) -> str:
    parts = ([f"{budget_s:.0f} s"] if budget_s > 0 else []) + ([f"{budget_samples} samples"] if budget_samples else [])
    return " or ".join(parts)


def per_run_table(results: dict, target: float) -> str:
    """One row per run: seed, how it ended, base / best / final value, the largest fall below
    its best, and the samples, network rows and FLOPs to ``target``."""
    rows = []
    for algo, curves in results.items():
        for seed, c in zip(curve_seeds(curves), curves):
            cost = [first_crossing(m.xs(c), c.values, target) if m.xs(c) else None for m in MEASURES[1:]]
            rows.append([algo, str(seed), c.ended, str(c.samples[-1]), f"{c.values[0]:.3f}", f"{max(c.values):.3f}",
                         f"{c.values[-1]:.3f}", f"{largest_fall(c.values):.3f}",
                         *("not reached" if x is None else f"{x:.3g}" for x in cost)])
    return markdown_table(["method", "seed", "ended", "samples", "base", "best", "final", "largest fall below the best",
                           *[f"{m.key} to target" for m in MEASURES[1:]]], rows)


def import_runs(manifest: Path, task: str, target: float | None = None) -> dict:
    """Benchmark data (the schema ``--from-json`` reads) from run folders made outside the
    benchmark, each with its own seed: ``{"runs": {method: {seed: run_dir}}, "protocol": text}``.
    ``method@label`` reports another setting of ``method`` as its own row (e.g. ``epg@paper``).

    ``"carry": {"results": OLD_JSON, "methods": {old_name: new_name}}`` also reports the curves
    of those methods from an earlier result file (e.g. runs whose folders are gone), renamed as
    given, after the manifest's own runs; a carried method joins the manifest's runs of the same
    name when their seeds differ (same lr).

    A run without ``summary.json``, or whose metrics go past its summary's epoch (resumed to more
    epochs and not yet ended), is reported as unfinished (its last evaluation counts as final).
    Every run of a method must share the learning rate, and its config's algorithm
    must be the method's; the target is the mean base value of the first method's runs + the
    task's delta unless ``target`` is given.
    """
    import yaml

    spec = TASKS[task]
    try:
        wanted = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"convergence: cannot read the manifest {manifest}: {err}") from None
    unknown = [m for m in wanted.get("runs", {}) if m.split("@")[0] not in spec.algos]
    if not wanted.get("runs") or unknown:
        raise SystemExit(f"convergence: {manifest} needs 'runs': {{method: {{seed: run_dir}}}} with methods from "
                         f"{list(spec.algos)} (unknown: {unknown})")
    curves, lrs, runs, wall = {}, {}, {}, 0.0
    for method, by_seed in wanted["runs"].items():
        curves[method], runs[method] = [], {}
        for seed_text, run_text in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            run = Path(run_text)
            if not (run / "metrics.jsonl").exists():
                raise SystemExit(f"convergence: {method} seed {seed_text}: no metrics.jsonl in {run}")
            config = yaml.safe_load((run / "config.yaml").read_text())
            name = method.split("@")[0]
            algo = VARIANTS.get(name, (name, None))[0]
            if config.get("algo") != algo:
                raise SystemExit(f"convergence: {run} ran algo '{config.get('algo')}', not {method}'s '{algo}'")
            lr = float(config["train"]["lr"])
            if lrs.setdefault(method, lr) != lr:
                raise SystemExit(f"convergence: {method}'s runs use different learning rates ({lrs[method]}, {lr})")
            curve = read_curve(run, spec.metric, spec.guard)
            curve.seed = int(seed_text)
            summary = run / "summary.json"
            info = json.loads(summary.read_text()) if summary.exists() else {}
            # A run resumed to more epochs keeps its earlier summary until it ends: the metrics past
            # the summary's epoch say it is still going.
            if info and info.get("epochs", curve.epochs) >= curve.epochs:
                curve.ended = info.get("stopped_by", "epochs")
                wall += info.get("wall_s", 0.0)
            else:
                curve.ended = f"unfinished (epoch {curve.epochs})"
            curves[method].append(curve)
            runs[method][seed_text] = {"run_dir": str(run), "ended": curve.ended}
    first = next(iter(curves.values()))
    carried = carry_curves(wanted.get("carry"), task, {m: {c.seed for c in cs} for m, cs in curves.items()})
    for method, (cs, lr, imported) in carried.items():
        if lrs.setdefault(method, lr) != lr:
            raise SystemExit(f"convergence: {method}'s imported and carried runs use different learning rates "
                             f"({lrs[method]}, {lr})")
        curves[method] = sorted(curves.get(method, []) + cs, key=lambda c: c.seed)
        runs[method] = dict(sorted({**runs.get(method, {}), **imported}.items(), key=lambda kv: int(kv[0])))
    seeds = sorted({c.seed for cs in curves.values() for c in cs})
    samples = max(c.samples[-1] for cs in curves.values() for c in cs)
    return {
        "task": task, "quick": False, "budget_s": 0.0, "budget_samples": samples, "seeds": seeds,
        "factors": [1.0], "tuning_seed": None, "command": command_line(), "commit": git_commit(),
        "machine_start": "imported runs (each run's summary.json -> numerics)", "machine_end": "-",
        "eval_every": None, "target": target if target is not None else (
            sum(c.values[0] for c in first) / len(first) + spec.target_delta),
        "lrs": lrs, "tuning_log": [], "elapsed_s": wall, "workers": None,
        "protocol": wanted.get("protocol", ""), "imported": runs,
        "curves": {m: [vars(c) for c in cs] for m, cs in curves.items()},
    }


def carry_curves(carry: dict | None, task: str,
                 taken: dict[str, set[int]]) -> dict[str, tuple[list[Curve], float, dict]]:
    """``{new_name: (curves, lr, imported)}`` from an earlier result file, for ``import_runs``'s
    ``carry`` entry (``{"results": path, "methods": {old_name: new_name}}``).  ``taken`` holds the
    seeds each method already has from run folders: a carried method may join them (e.g. new
    seeds of a method whose first seed's folder is gone), but not on a seed it already has."""
    if not carry:
        return {}
    try:
        old = json.loads(Path(carry["results"]).read_text())
    except (KeyError, OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"convergence: cannot read the carried results {carry.get('results')}: {err}") from None
    if old.get("task") != task:
        raise SystemExit(f"convergence: {carry['results']} is a {old.get('task')} result, not {task}")
    out = {}
    for old_name, new_name in carry.get("methods", {}).items():
        if old_name not in old["curves"]:
            raise SystemExit(f"convergence: {carry['results']} has no '{old_name}' (it has {list(old['curves'])})")
        curves = [Curve(**c) for c in old["curves"][old_name]]
        both = sorted(taken.get(new_name, set()) & {c.seed for c in curves})
        if both or new_name in out:
            raise SystemExit(f"convergence: '{new_name}' (seeds {both}) is both imported and carried; rename one")
        imported = {seed: {**info, "carried_from": carry["results"]}
                    for seed, info in old.get("imported", {}).get(old_name, {}).items()}
        out[new_name] = (curves, old["lrs"][old_name], imported)
    return out


def write_report(data: dict, stem: Path, note: str = "") -> str:
    """Markdown table + PNG from a benchmark's saved data (see ``--from-json``)."""
    spec = TASKS[data["task"]]
    results = {a: [Curve(**c) for c in cs] for a, cs in data["curves"].items()}
    seeds, budget_s, target = data["seeds"], data["budget_s"], data["target"]
    first = next(iter(results.values()))
    base = sum(c.values[0] for c in first) / len(first)
    table, _ = summarize(data["task"], spec, results, data["lrs"], target, base, budget_s, seeds)
    budget = budget_text(budget_s, data.get("budget_samples", 0))
    title = f"{data['task']}: held-out {spec.metric}, {budget} of training per run, seeds {seeds}"
    plot(results, spec, target, budget_s, stem.with_suffix(".png"), title)
    stops = [f"- {a} seed {s}: {c.ended} (after {c.epochs} epochs; last evaluation after {c.samples[-1]} samples, "
             f"{c.seconds[-1]:.1f}s)"
             for a, cs in results.items() for s, c in zip(curve_seeds(cs), cs)
             if c.ended.startswith(("stopped", "unfinished"))]
    stopped = ("Runs that ended before the budget (their last evaluation counts as final):\n"
               + "\n".join(stops) + "\n") if stops else ""
    tuning = ("\n".join(f"- {line}" for line in data["tuning_log"]) if data["tuning_log"] else
              f"- none beyond each config's own lr (factors {data['factors']}): equal (zero) tuning for every method")
    if data.get("imported"):
        protocol = f"""Imported runs (made outside the benchmark, each method on the seeds listed; `--import-runs`):
{data['protocol']}
Held-out metric: `{spec.metric}`; base {base:.3f} (mean over the first method's seeds); **target {target:.3f}**.
Cost-to-target (training seconds, samples, network rows = `perf/network_rows_fwd` +
`perf/network_rows_bwd`, and `perf/flops`; the last two do not depend on the machine or its load) is
read at evaluation resolution, means ± std over the seeds that reached it; speed-ups are per-seed
ratios Flow-GRPO / method over the seeds both ran (mean [min–max]); '≥' marks a lower bound where
Flow-GRPO missed the target (its whole run on that seed counted as its cost).
"""
    else:
        protocol = f"""Every method starts from the same base model and uses the same seeds {seeds} (prompts and
noise are keyed by the seed; runs interleaved over methods), {budget} of training each
(`train.max_wall_s` / `train.max_samples`: rollouts + rewards + updates; held-out evaluation every
{data['eval_every']} epochs is not counted).  Held-out metric: `{spec.metric}`; base {base:.3f} (mean over
seeds); **target {target:.3f}**.  Cost-to-target (training seconds, samples, network rows =
`perf/network_rows_fwd` + `perf/network_rows_bwd`, and `perf/flops`; the last two do not depend on the
machine or its load) is read at evaluation resolution, means ± std over the seeds that reached it;
speed-ups are per-seed ratios Flow-GRPO / method (mean [min–max]); '≥' marks a lower bound
where Flow-GRPO missed the target (its whole run counted as its cost).
"""
    if spec.guard and f"final {spec.guard}" in table:
        protocol += (f"`{spec.guard}` (final value and change from the base, means ± std over seeds) is the "
                     "share of images that draw more of a named shape than asked: a gain in the metric "
                     "made by over-drawing shows there (docs/shapes.md, \"Why counting falls\").\n")
    if data["curves"]:
        table += "\n\nPer run (target as above; cost at the first evaluation at or above it):\n\n" + per_run_table(
            results, target)
    text = f"""# Convergence on {data['task']}{' (quick)' if data['quick'] else ''}

Command: `{data['command']}` (commit {data['commit']}, {data['elapsed_s'] / 60:.1f} min in all).{note}
Machine at start: {data['machine_start']}.
Machine at end: {data['machine_end']}.

{protocol}
Tuning budget (equal for every method; tuning seed {data['tuning_seed']}, not reported):
{tuning}

{table}

{stopped}
![curves]({stem.with_suffix('.png').name})
"""
    stem.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
