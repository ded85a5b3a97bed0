"""Side-by-side diagnostics of training runs: the held-out metric and chosen training statistics
against the epoch, from each run folder's ``metrics.jsonl``.

    python benchmarks/run_diagnostics.py LABEL=RUN_DIR ... --out STEM
        [--metric eval/strict] [--stats stats/x0_mse,reward/shapes_eval/strict] [--smooth 15]

Writes ``STEM.md`` (the held-out metric at every evaluation, per run, and each statistic's mean
over windows of ``--smooth`` epochs) and ``STEM.png`` (one panel per quantity).  Used to show how
a run fails (``docs/algorithms/advantageflow.md``); it reads runs made by ``advantageflow train``
and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunSeries:
    """One run's held-out values ``evals`` ``[(epoch, value)]`` and per-epoch statistics
    ``stats[key] = [(epoch, value)]``."""

    label: str
    evals: list[tuple[int, float]]
    stats: dict[str, list[tuple[int, float]]]


def read_series(label: str, run: Path, metric: str, stats: list[str]) -> RunSeries:
    """The run's series from ``run/metrics.jsonl`` (rows without ``epoch`` are skipped)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"run_diagnostics: no metrics.jsonl in {run}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "epoch" in r]
    evals = [(int(r["epoch"]), float(r[metric])) for r in rows if metric in r]
    series = {k: [(int(r["epoch"]), float(r[k])) for r in rows if k in r] for k in stats}
    return RunSeries(label, evals, series)


def windows(points: list[tuple[int, float]], size: int) -> list[tuple[int, float]]:
    """Means over consecutive windows of ``size`` points, each labelled by its first epoch."""
    out = []
    for i in range(0, len(points), size):
        chunk = points[i : i + size]
        out.append((chunk[0][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def report(series: list[RunSeries], metric: str, stats: list[str], smooth: int) -> str:
    """Markdown: the held-out metric per evaluation, then each statistic's window means."""
    lines = [f"Held-out `{metric}` at each evaluation (epoch: value):", ""]
    for s in series:
        best = max((v for _, v in s.evals), default=float("nan"))
        last = s.evals[-1][1] if s.evals else float("nan")
        text = ", ".join(f"{e}: {v:.3f}" for e, v in s.evals)
        lines.append(f"- **{s.label}**: {text} (best {best:.3f}, last {last:.3f}, fall {best - last:.3f})")
    for key in stats:
        lines += ["", f"`{key}`, mean over {smooth} epochs (first epoch of the window: value):", ""]
        for s in series:
            text = ", ".join(f"{e}: {v:.4g}" for e, v in windows(s.stats.get(key, []), smooth))
            lines.append(f"- {s.label}: {text or '(not logged)'}")
    return "\n".join(lines) + "\n"


def plot(series: list[RunSeries], metric: str, stats: list[str], smooth: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [metric, *stats]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for s in series:
            pts = s.evals if key == metric else windows(s.stats.get(key, []), smooth)
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o" if key == metric else None,
                        ms=3, label=s.label)
        ax.set_title(key if key == metric else f"{key} ({smooth}-epoch mean)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # Below the panels: with many runs a legend inside a panel covers the curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    legend = fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                        ncol=min(3, max(1, len(labels))), fontsize=7, frameon=False)
    fig.savefig(path, dpi=110, bbox_extra_artists=[legend], bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", required=True, help="output stem (.md and .png)")
    ap.add_argument("--metric", default="eval/strict")
    ap.add_argument("--stats", default="stats/x0_mse,reward/shapes_eval/strict",
                    help="comma list of per-epoch keys to plot (window means)")
    ap.add_argument("--smooth", type=int, default=15, help="epochs per window of the statistics")
    args = ap.parse_args(argv)
    bad = [r for r in args.runs if "=" not in r]
    if bad:
        raise SystemExit(f"run_diagnostics: give runs as LABEL=RUN_DIR (got {bad})")
    stats = [k for k in args.stats.split(",") if k]
    labelled = [r.split("=", 1) for r in args.runs]
    series = [read_series(label, Path(run), args.metric, stats) for label, run in labelled]
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = report(series, args.metric, stats, args.smooth)
    command = "python benchmarks/run_diagnostics.py " + " ".join(sys.argv[1:] if argv is None else argv)
    picture = stem.with_suffix(".png").name
    stem.with_suffix(".md").write_text(f"Command: `{command}`\n\n{text}\n![diagnostics]({picture})\n")
    plot(series, args.metric, stats, args.smooth, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
