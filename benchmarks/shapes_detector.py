"""How reliable is ShapesEval's detector?  Strict accuracy on random renders, clean and
perturbed, and the false-positive rate on renders that break exactly one clause.

    python benchmarks/shapes_detector.py [--scenes 400] [--seed 0]

Prints a markdown table (the one in ``docs/shapes.md``) and writes it with the raw numbers to
``benchmarks/results/shapes_detector.{md,json}``.  numpy only; about a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from advantageflow.tasks.shapes.evaluator import score
from advantageflow.tasks.shapes.grammar import all_specs, eval_slots
from advantageflow.tasks.shapes.perturb import break_one_clause, gaussian_blur
from advantageflow.tasks.shapes.scene import render_specs

RESULTS = Path(__file__).resolve().parent / "results"


def _strict(images: torch.Tensor, specs: list) -> float:
    verdicts = score(images, specs)
    return sum(v.strict for v in verdicts) / len(verdicts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--scenes", type=int, default=400, help="random scenes per condition")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    pool = all_specs()
    specs = [rng.choice(pool) for _ in range(args.scenes)]
    images, _ = render_specs(specs, rng)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(args.seed))
    rows: list[tuple[str, float, int]] = [("clean", _strict(images, specs), len(specs))]
    for level in (0.05, 0.1, 0.15, 0.2, 0.3):
        rows.append((f"Gaussian noise std {level}", _strict((images + level * noise).clamp(0, 1), specs), len(specs)))
    for sigma in (0.5, 0.8, 1.0, 1.5):
        rows.append((f"Gaussian blur sigma {sigma}", _strict(gaussian_blur(images, sigma), specs), len(specs)))
    for k in (1, 2):
        small = [s for s in pool if sum(o.count for o in s.objects) + k <= 4]
        chosen = [rng.choice(small) for _ in range(args.scenes)]
        imgs, _ = render_specs(chosen, rng, distractors=k)
        rows.append((f"{k} distractor object(s) of an unmentioned shape", _strict(imgs, chosen), len(chosen)))
    originals, broken, kinds = [], [], []
    for spec in list(eval_slots()) * max(1, args.scenes // 40):
        bad, kind = break_one_clause(spec, rng)
        originals.append(spec)
        broken.append(bad)
        kinds.append(kind)
    imgs, _ = render_specs(broken, rng)
    verdicts = score(imgs, originals)
    negatives = []
    for kind in sorted(set(kinds)):
        mine = [v.strict for v, k in zip(verdicts, kinds) if k == kind]
        negatives.append((kind, sum(mine) / len(mine), len(mine)))
    lines = ["| renders | strict accuracy | images |", "|---|---|---|"]
    lines += [f"| {name} | {acc:.3f} | {n} |" for name, acc, n in rows]
    lines += ["", "| negative control (breaks exactly one clause) | judged correct (false positive) | images |",
              "|---|---|---|"]
    lines += [f"| {name} | {fp:.3f} | {n} |" for name, fp, n in negatives]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    cmd = "python benchmarks/shapes_detector.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (RESULTS / "shapes_detector.md").write_text(f"`{cmd.strip()}`\n\n{table}\n")
    (RESULTS / "shapes_detector.json").write_text(json.dumps(
        {"command": cmd.strip(), "accuracy": rows, "negative_controls": negatives}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
