"""OCR backends on rendered words: how often each reads the target, and what it costs.

    python benchmarks/ocr_backends.py [--words 200] [--sizes 512,512s,32] [--upscale-small 4]
        [--backends ppocr,tesseract] [--out benchmarks/results/ocr_backends.md]

The word set is the project's own OCR targets (``advantageflow.prompts.generate.ocr_targets``,
words, then short phrases), each rendered once per image size in one of three DejaVu fonts
(Sans, Serif, Sans Mono, in turn), in lower, Title or UPPER case, dark text on a light
background at a random size and place (seeded): 40-85 % of the image's width, or 10-25 %
for a size written with an ``s`` (``512s``: small text, as on a sign in a generated scene).
Every image goes through the ``ocr`` reward itself (``OcrReward.recognise`` then
``ocr_score``, as its ``__call__`` does), both backends image by image in turn so that both
see the same machine load; each backend reads one warm-up image first (PP-OCR loads its
models on first use).

Reported per backend and size: the fraction of images with reward 1 (the target is contained
in the recognised text, Flow-GRPO's definition), the fraction read exactly (normalised text
equal), the mean reward, and the CPU seconds (this process plus child processes, i.e.
tesseract) and wall seconds per image.  CPU time is the figure to compare on a shared machine;
wall time depends on what else runs.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advantageflow.prompts.generate import ocr_targets  # noqa: E402
from advantageflow.rewards import build_reward  # noqa: E402
from advantageflow.rewards.imageio import from_uint8, to_pil  # noqa: E402
from advantageflow.rewards.ocr import normalise_text, ocr_score  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {"DejaVu Sans": "DejaVuSans.ttf", "DejaVu Serif": "DejaVuSerif.ttf", "DejaVu Sans Mono": "DejaVuSansMono.ttf"}


def case_style(word: str, k: int) -> str:
    return [word.lower(), word.title(), word.upper()][k % 3]


def render_word(
    text: str, font_file: Path, size: int, rng: random.Random, width: tuple[float, float] = (0.4, 0.85)
) -> np.ndarray:
    """``(size, size, 3)`` uint8: ``text`` on one line, as large as fits in a random fraction
    ``width`` of the image's width."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    target_w = size * rng.uniform(*width)
    pt = max(6, int(size * 0.3))
    while pt > 6:
        font = ImageFont.truetype(str(font_file), pt)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= target_w and bottom - top <= size * 0.4:
            break
        pt -= 1
    font = ImageFont.truetype(str(font_file), pt)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = rng.randint(0, max(0, size - (right - left))) - left
    y = rng.randint(0, max(0, size - (bottom - top))) - top
    draw.text((x, y), text, fill=tuple(rng.randint(0, 60) for _ in range(3)), font=font)
    return np.asarray(img)


@dataclass
class Tally:
    rewards: list[float] = field(default_factory=list)
    exact: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    misreads: list[tuple[str, str, float]] = field(default_factory=list)
    by_font: dict[str, list[float]] = field(default_factory=dict)


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def score_one(reward, array: np.ndarray, target: str, font: str, tally: Tally) -> None:
    images = from_uint8(array[None])
    c0, t0 = cpu_seconds(), time.perf_counter()
    text = reward.recognise(to_pil(images)[0])  # what OcrReward.__call__ does, keeping the text
    value = ocr_score(text, target)
    tally.wall += time.perf_counter() - t0
    tally.cpu += cpu_seconds() - c0
    tally.rewards.append(value)
    tally.by_font.setdefault(font, []).append(value)
    tally.exact += normalise_text(text) == normalise_text(target)
    if value < 1.0:
        tally.misreads.append((target, text.strip().replace("\n", " "), value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument(
        "--sizes", default="512,512s,32", help="square image sizes (configs: 512 real models, 32 tiny); s: small text"
    )
    parser.add_argument("--upscale-small", type=int, default=4, help="reward 'upscale' for sizes below 128")
    parser.add_argument("--backends", default="ppocr,tesseract")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/ocr_backends.md")
    args = parser.parse_args(argv)

    words = ocr_targets()[: args.words]
    sizes = args.sizes.split(",")
    backends = args.backends.split(",")
    fonts = [(name, FONT_DIR / file) for name, file in FONTS.items()]
    load0 = os.getloadavg()[0]
    lines = [
        "# OCR backends on rendered words",
        "",
        f"`python benchmarks/ocr_backends.py --words {args.words} --sizes {args.sizes} "
        f"--upscale-small {args.upscale_small} --seed {args.seed}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"{len(words)} targets (the project's OCR words/phrases), fonts {', '.join(FONTS)} in turn, "
        f"lower/Title/UPPER case in turn; machine: {os.cpu_count()} CPUs, load average {load0:.1f} at start; "
        "one thread per backend (`omp_threads=1`, `workers=1`).",
        "",
        "| size | backend | upscale | reward = 1 | read exactly | mean reward | CPU s/image | wall s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for spec in sizes:
        size, small = int(spec.rstrip("s")), spec.endswith("s")
        width = (0.1, 0.25) if small else (0.4, 0.85)
        label = f"{size} (small text)" if small else str(size)
        upscale = args.upscale_small if size < 128 else 1
        # A generous tesseract timeout: on a loaded machine a niced process can wait long for a core.
        extra = {"tesseract": {"timeout": 600}}
        rewards = {b: build_reward("ocr", {"backend": b, "upscale": upscale, **extra.get(b, {})}) for b in backends}
        tallies = {b: Tally() for b in backends}
        rng = random.Random(f"{args.seed}:{spec}")
        warm = render_word("warm up", fonts[0][1], size, random.Random(1))
        for b in backends:
            score_one(rewards[b], warm, "warm up", "", Tally())
        for i, word in enumerate(words):
            font_name, font_file = fonts[i % len(fonts)]
            array = render_word(case_style(word, i // len(fonts)), font_file, size, rng, width)
            for b in backends:
                score_one(rewards[b], array, word, font_name, tallies[b])
            if (i + 1) % 20 == 0:
                done = ", ".join(f"{b} {np.mean(t.rewards):.3f}" for b, t in tallies.items())
                print(f"[{label}] {i + 1}/{len(words)}: mean reward {done}", flush=True)
        for b, t in tallies.items():
            n = len(t.rewards)
            ones = sum(r == 1.0 for r in t.rewards)
            lines.append(
                f"| {label} | {b} | {upscale} | {ones / n:.3f} ({ones}/{n}) | {t.exact / n:.3f} | "
                f"{np.mean(t.rewards):.3f} | {t.cpu / n:.3f} | {t.wall / n:.3f} |"
            )
            fonts_line = ", ".join(f"{f} {np.mean(v):.3f}" for f, v in t.by_font.items())
            details.append(f"- {label}, {b}: mean reward by font: {fonts_line}; {len(t.misreads)} below 1")
            for target, text, value in t.misreads[:8]:
                details.append(f"  - `{target}` read as `{text}` ({value:.2f})")
        write(args.out, lines, details)  # after each size, so a long run leaves its first results
    print(Path(args.out).read_text())
    return 0


def write(out: str, lines: list[str], details: list[str]) -> None:
    tail = ["", f"load average {os.getloadavg()[0]:.1f} at the end", "", "Misreads (first 8 each):", ""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join([*lines, *tail, *details]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
