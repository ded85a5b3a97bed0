"""The sample figures of ``docs/shapes.md`` for a ShapesDiT asset ('' = the shipped one).

    python scripts/shapes_figures.py [--asset DIR|NAME] [--out docs] [--suffix _unet]

Writes ``shapes_base_samples.png`` (the first 4 evaluation slots of each tag, in tag order,
one sample each with the evaluation's noise keys, seed 0, as ``advantageflow eval`` draws
them) and ``shapes_word_binding.png`` ("a red X" for the eight shapes (rows) from the same
eight noises (columns): where the word decides the outline, each column shows eight shapes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from advantageflow.models.dit import ShapesDiTPolicy  # noqa: E402
from advantageflow.tasks.shapes.evaluator import asset_sampler, sample_shapes_eval  # noqa: E402
from advantageflow.tasks.shapes.grammar import EVAL_SLOTS_PER_TAG, eval_slots, parse_prompt, to_prompt  # noqa: E402
from advantageflow.tasks.shapes.scene import SHAPES  # noqa: E402

SCALE = 3


def tile(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in ``[0, 1]`` -> a PIL image ``SCALE`` times larger (nearest)."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * SCALE, pil.height * SCALE), Image.NEAREST)


def captioned_grid(images: list[torch.Tensor], captions: list[str], columns: int, title: str) -> Image.Image:
    side, pad, cap = 32 * SCALE, 4, 14
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (side + pad) + pad, 18 + rows * (side + cap + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 3), title, fill="black")
    for k, (img, text) in enumerate(zip(images, captions)):
        x, y = pad + (k % columns) * (side + pad), 18 + (k // columns) * (side + cap + pad)
        grid.paste(tile(img), (x, y))
        draw.text((x, y + side + 1), text[:17], fill="black")
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--asset", default="", help="asset folder ('' = the shipped model)")
    p.add_argument("--out", default="docs")
    p.add_argument("--suffix", default="", help="added to both file names (e.g. _unet for model.path=shapes_unet)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=a.asset))
    sampler = asset_sampler(policy)
    slots = eval_slots()
    chosen = [slots[t * EVAL_SLOTS_PER_TAG + i] for t in range(len(slots) // EVAL_SLOTS_PER_TAG) for i in range(4)]
    images = sample_shapes_eval(policy, chosen, 1, sampler, seed=0)
    samples_png, words_png = out / f"shapes_base_samples{a.suffix}.png", out / f"shapes_word_binding{a.suffix}.png"
    title = f"samples of {a.asset or 'the shipped model'}"
    captioned_grid(list(images), [to_prompt(s) for s in chosen], 4, title).save(samples_png)
    shapes = list(SHAPES)
    specs = [parse_prompt(f"a red {shape}") for shape in shapes for _ in range(8)]
    # the same 8 noises in every row: sample j of each row uses the noise key of slot j
    from advantageflow.rollouts import SamplingSpec, decode_samples, generate_from_noise, sample_noise
    from advantageflow.seeding import eval_noise_key
    from advantageflow.tasks.base import Prompt

    noise, _ = sample_noise(tuple(policy.sample_shape), [eval_noise_key(0, j) for j in range(8)])
    noise = noise.repeat(len(shapes), 1, 1, 1)
    spec = SamplingSpec.for_evaluation(policy, sampler)
    rollout = generate_from_noise(policy, [Prompt(to_prompt(s)) for s in specs], noise, list(range(len(specs))), spec)
    words = decode_samples(policy, rollout.x0, spec.chunk)
    captioned_grid(list(words), [to_prompt(s) for s in specs], 8,
                   "same noise per column, one shape word per row").save(words_png)
    print(f"wrote {samples_png} and {words_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
