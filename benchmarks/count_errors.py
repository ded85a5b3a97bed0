"""How many objects does a model draw, against how many the prompt asks for?  Per ShapesEval tag,
on the held-out evaluation's images (the same slots, samples and noise as ``advantageflow eval``).

    python benchmarks/count_errors.py LABEL=SOURCE ... [--samples 9] [--out STEM]

``SOURCE`` is a run folder or checkpoint of ``advantageflow train`` (its newest intact checkpoint,
with the run's own config), or ``asset:NAME`` for a shipped base (``asset:`` = the main job's,
``asset:shapes_unet``).  For every image and every object of its prompt the detector's count of
that shape minus the asked count; per tag the share of objects drawn too few / exactly / too
many times, the mean surplus, and the strict score.  Why: the reward gives partial credit and,
outside the counting tag, a count clause holds with *at least* the asked number (GenEval's
rule), so RL can learn to draw extra objects, which only the counting tag's exact clause
penalises (``docs/shapes.md``, "RL from it").  Writes ``STEM.md``; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TagCounts:
    """Per-object count errors of one tag: ``surplus`` (detected - asked) per prompt object."""

    surplus: list[int] = field(default_factory=list)
    strict: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        n = len(self.surplus)
        few = sum(s < 0 for s in self.surplus) / n
        many = sum(s > 0 for s in self.surplus) / n
        return [f"{few:.3f}", f"{1 - few - many:.3f}", f"{many:.3f}",
                f"{sum(self.surplus) / n:+.2f}", f"{sum(self.strict) / len(self.strict):.3f}"]


def load_policy(source: str):
    """The policy of a run folder / checkpoint, or of a shipped asset (``asset:NAME``)."""
    from advantageflow.cli import _config_for_checkpoint, _load_policy

    if source.startswith("asset:"):
        cfg, ckpt = _config_for_checkpoint([f"model.path={source[len('asset:'):]}"], None)
    else:
        cfg, ckpt = _config_for_checkpoint([], source, trust=True)
    return _load_policy(cfg, ckpt).policy


def count_errors(policy, samples: int, seed: int = 0) -> dict[str, TagCounts]:
    """Per tag, the count errors of the evaluation slots' images (``samples`` per slot)."""
    from advantageflow.tasks.shapes.evaluator import asset_sampler, sample_shapes_eval
    from advantageflow.tasks.shapes.grammar import eval_slots

    slots = list(eval_slots())
    images = sample_shapes_eval(policy, slots, samples, asset_sampler(policy), seed=seed)
    return count_errors_of_images(images, [slots[i // samples] for i in range(len(images))])


def count_errors_of_images(images, specs) -> dict[str, TagCounts]:
    """Per tag, the count errors of ``images`` ``(B, 3, H, W)`` against their ``B`` specs."""
    from advantageflow.tasks.shapes.evaluator import check, detect

    out: dict[str, TagCounts] = defaultdict(TagCounts)
    for spec, found in zip(specs, detect(images)):
        for obj in spec.objects:
            out[spec.tag].surplus.append(sum(d.shape == obj.shape for d in found) - obj.count)
        out[spec.tag].strict.append(check(spec, found).strict)
    return dict(out)


def report(results: dict[str, dict[str, TagCounts]], samples: int) -> str:
    lines = [
        "# Objects drawn against objects asked, per ShapesEval tag",
        "",
        f"`python benchmarks/count_errors.py` ({samples} samples per evaluation slot, the evaluation's noise). "
        "Per prompt object: the detector's count of its shape minus the asked count.",
        "",
        "| model | tag | too few | exact | too many | mean surplus | strict |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, tags in results.items():
        for tag, counts in tags.items():
            lines.append("| " + " | ".join([label, tag, *counts.row()]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=SOURCE (run folder, checkpoint or asset:NAME)")
    ap.add_argument("--samples", type=int, default=9, help="samples per evaluation slot (the evaluation's: 9)")
    ap.add_argument("--out", default="", help="write STEM.md too")
    args = ap.parse_args(argv)
    results = {}
    for item in args.models:
        label, sep, source = item.partition("=")
        if not sep:
            ap.error(f"expected LABEL=SOURCE, got {item!r}")
        results[label] = count_errors(load_policy(source), args.samples)
    text = report(results, args.samples)
    print(text)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
