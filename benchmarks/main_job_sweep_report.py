"""Table of a main-job sweep (benchmarks/main_job_sweep_gpu.sh): the mean held-out gain per evaluation.

    python benchmarks/main_job_sweep_report.py --runs /tmp/main_job_sweep --out sweep.json
    python benchmarks/main_job_sweep_report.py --json sweep.json        # the table again

A run is a folder ``NAME_sSEED`` holding ``metrics.jsonl``; a variant is the runs sharing NAME.
Each row: the variant's seeds, its mean ShapesEval strict gain over the base (``eval/strict``
at epoch e minus at epoch 0, averaged over seeds) at each evaluation, and its worst seed's gain
at the last evaluation every seed reached.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

KEEP = ("epoch", "eval/strict", "eval/strict_se")


def read_runs(folder: Path) -> dict[str, list[dict]]:
    """{run name: its evaluations [{epoch, eval/strict, eval/strict_se, eval/strict/<tag>}]}."""
    runs = {}
    for run in sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").exists()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[run.name] = [{k: v for k, v in r.items() if k in KEEP or k.startswith("eval/strict/")}
                          for r in rows if "eval/strict" in r]
    return runs


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one row per variant, the mean gain at each evaluation epoch."""
    variants: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for name, evals in runs.items():
        variant, seed = name.rsplit("_s", 1)
        variants[variant][seed] = evals
    lines = ["| variant | seeds | mean gain at epoch ... | worst seed (last) |", "|---|---|---|---|"]
    for variant, by_seed in sorted(variants.items()):
        n = min(len(e) for e in by_seed.values())
        if n < 2:
            continue
        gains = [[e[i]["eval/strict"] - e[0]["eval/strict"] for e in by_seed.values()] for i in range(n)]
        epochs = next(iter(by_seed.values()))
        curve = " ".join(f"{epochs[i]['epoch']}: {sum(g) / len(g):+.3f}" for i, g in enumerate(gains) if i)
        lines.append(f"| {variant} | {','.join(sorted(by_seed))} | {curve} | {min(gains[-1]):+.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, help="folder of run folders NAME_sSEED")
    ap.add_argument("--json", type=Path, nargs="*", default=[], help="earlier outputs of --out to tabulate")
    ap.add_argument("--out", type=Path, help="write every run's evaluations here (JSON)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {}
    for path in args.json:
        runs.update(json.loads(path.read_text()))
    if args.runs:
        runs.update(read_runs(args.runs))
    if not runs:
        raise SystemExit("main_job_sweep_report: no runs (give --runs FOLDER or --json FILE)")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
