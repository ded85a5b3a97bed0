"""Is there a signal in RL's groups?  Per ShapesEval tag, how often a group of samples of one
train-split prompt is mixed (some images strictly right, some wrong), which is where
group-relative advantages can tell a right image from a wrong one.

    python benchmarks/group_signal.py LABEL=SOURCE ... [--group 16] [--prompts 48] [--steps 10]

``SOURCE`` as in ``count_errors.py`` (a run folder or checkpoint, or ``asset:NAME``).  Each
prompt gets ``--group`` samples (the main job's ``train.group_size``) with the asset's sampler
at ``--steps`` Euler steps (the main job's rollouts: ``sampler.steps`` 10), from the
evaluation's noise keys of ``--seed``.  Per tag: strict over all images, the mean within-group
variance of strict ``p (1 - p)`` (``p``: a prompt's share of strictly right images; 0.25 at
most), the share of mixed groups, the same two for strict with exact counts (no shape drawn
too often: what the main job's reward asks), and the mean within-group variance of partial
credit with GenEval's counting rule.  Why: RL from the CPU-made U-Net does not learn colour
attribution where RL from the DiT does (``docs/shapes.md``, "Why RL from the U-Nets stalls");
this asks whether the U-Net's groups hold less to learn from.  Writes ``STEM.md``; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

TAGS = ("color_attr", "position", "counting")


def group_stats(policy, specs, group: int, steps: int, seed: int) -> dict[str, float]:
    """Strict, within-group strict variance, share of mixed groups and within-group partial
    variance of ``group`` samples of each spec (``steps`` Euler steps)."""
    from advantageflow.tasks.shapes.evaluator import asset_sampler, sample_shapes_eval, score

    sampler = replace(asset_sampler(policy), eval_steps=steps)
    images = sample_shapes_eval(policy, specs, group, sampler, seed)
    verdicts = score(images, [s for s in specs for _ in range(group)])
    strict = np.array([v.strict for v in verdicts]).reshape(len(specs), group)
    exact = np.array([v.strict_exact for v in verdicts]).reshape(len(specs), group)
    partial = np.array([v.partial for v in verdicts]).reshape(len(specs), group)
    p, q = strict.mean(axis=1), exact.mean(axis=1)
    return {
        "strict": float(strict.mean()),
        "strict_var": float(np.mean(p * (1 - p))),
        "mixed": float(np.mean((p > 0) & (p < 1))),
        "exact": float(exact.mean()),
        "exact_var": float(np.mean(q * (1 - q))),
        "partial_var": float(partial.var(axis=1).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    from common import write_report
    from count_errors import load_policy

    from advantageflow.tasks.shapes.grammar import splits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=SOURCE")
    p.add_argument("--group", type=int, default=16, help="samples per prompt (train.group_size)")
    p.add_argument("--prompts", type=int, default=48, help="first N train-split prompts of each tag")
    p.add_argument("--steps", type=int, default=10, help="Euler steps (sampler.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="group_signal", help="output stem (STEM.md)")
    args = p.parse_args(argv)
    train = list(splits()[0])
    lines = [
        f"{args.group} samples of each of the first {args.prompts} train-split prompts per tag, "
        f"{args.steps} Euler steps, seed {args.seed}",
        "",
        "| model | tag | strict | within-group var of strict | mixed groups | strict_exact "
        "| within-group var of strict_exact | within-group var of partial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in args.models:
        label, _, source = item.partition("=")
        policy = load_policy(source)
        for tag in TAGS:
            specs = [s for s in train if s.tag == tag][: args.prompts]
            r = group_stats(policy, specs, args.group, args.steps, args.seed)
            lines.append(f"| {label} | {tag} | {r['strict']:.3f} | {r['strict_var']:.4f} | {r['mixed']:.2f} "
                         f"| {r['exact']:.3f} | {r['exact_var']:.4f} | {r['partial_var']:.4f} |")
            print(lines[-1], flush=True)
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
