"""Where does RL find a signal?  Per ShapesEval tag, a model's strict score on the prompts RL
trains on (the train split, every prompt) beside the held-out evaluation's.

    python benchmarks/train_split_tags.py LABEL=SOURCE ... [--samples 2] [--out STEM]

``SOURCE`` as in ``count_errors.py`` (a run folder or checkpoint, or ``asset:NAME``).  The
trainer draws its prompts uniformly from the train split (``rollouts.plan_epoch``), so a tag's
share of the RL prompts is its share of that split; a tag the model almost never gets right
gives groups with no strict success, whose advantages rank only partial credit.  Why: RL from
the CPU-made U-Nets gains little and drifts where RL from the DiT gains +0.2 (``docs/shapes.md``,
"Why RL from the U-Nets stalls").  Sampling as the evaluation (the asset's sampler, the
evaluation's noise keys); writes ``STEM.md``; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def tag_scores(policy, specs, samples: int) -> dict[str, float]:
    """Strict per tag over ``samples`` images of each spec: the per-tag rows of
    :func:`~advantageflow.tasks.shapes.evaluator.evaluate_shapes_eval` (the evaluation's
    sampler and noise keys)."""
    from advantageflow.tasks.shapes.evaluator import evaluate_shapes_eval

    result = evaluate_shapes_eval(policy, specs, samples_per_prompt=samples)
    return {key.split("/", 1)[1]: value for key, value in result.items()
            if key.startswith("strict/") and key != "strict/images"}


def main(argv: list[str] | None = None) -> int:
    from common import write_report
    from count_errors import load_policy

    from advantageflow.tasks.shapes.grammar import eval_slots, splits
    from advantageflow.tasks.shapes.scene import TAGS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=SOURCE")
    p.add_argument("--samples", type=int, default=2, help="images per train-split prompt")
    p.add_argument("--eval-samples", type=int, default=9, help="images per held-out slot")
    p.add_argument("--out", default="train_split_tags", help="output stem (STEM.md)")
    args = p.parse_args(argv)

    train = list(splits()[0])
    slots = list(eval_slots())
    share = Counter(s.tag for s in train)
    header = ["tag", "train prompts (share of RL draws)"]
    columns = {}
    for item in args.models:
        label, _, source = item.partition("=")
        policy = load_policy(source)
        columns[label] = (tag_scores(policy, train, args.samples), tag_scores(policy, slots, args.eval_samples))
        header += [f"{label}: train split", f"{label}: held-out"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tag in TAGS:
        row = [tag, f"{share[tag]} ({share[tag] / len(train):.0%})"]
        for on_train, held_out in columns.values():
            row += [f"{on_train[tag]:.3f}" if tag in on_train else "-", f"{held_out[tag]:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**RL-weighted** (prompt share x train-split strict)", f"{len(train)}"]
    for on_train, held_out in columns.values():
        weighted = sum(share[t] * on_train[t] for t in on_train) / len(train)
        row += [f"**{weighted:.3f}**", f"{sum(held_out.values()) / len(held_out):.3f} (tag mean)"]
    lines.append("| " + " | ".join(row) + " |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
