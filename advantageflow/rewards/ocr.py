"""OCR reward with the tesseract engine (the Flow-GRPO / AWM text-rendering reward).

Definition (Flow-GRPO, Liu et al. 2025, Sec. 5 "Visual text rendering"; same in AWM):
the target text is what lies between the first pair of double quotes in the prompt; both
target and recognised text are lower-cased with spaces removed; the reward is 1 when the
recognised text contains the target, else ``1 - min(d, n) / n`` with ``d`` the Levenshtein
distance between recognised text and target and ``n`` the target's length.

The authors recognise with PaddleOCR; this module runs Debian's ``tesseract`` command line
(no Python binding needed), one process per image, ``workers`` at a time.  Not differentiable.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor

from advantageflow.rewards.base import RewardError
from advantageflow.rewards.imageio import check_images, to_pil


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalise_text(text: str) -> str:
    """Lower-case and drop all whitespace (Flow-GRPO removes spaces; newlines go too)."""
    return "".join(text.lower().split())


def extract_target(prompt: str) -> str:
    """The text between the first pair of double quotes; ``RewardError`` if there is none."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise RewardError(f"ocr reward: prompt has no text in double quotes: {prompt!r}")
    return parts[1]


def ocr_score(recognised: str, target: str) -> float:
    """``1`` if normalised ``target`` is in normalised ``recognised``, else
    ``1 - min(edit_distance, n) / n``."""
    rec, tgt = normalise_text(recognised), normalise_text(target)
    if not tgt:
        raise RewardError("ocr reward: the quoted target text is empty")
    if tgt in rec:
        return 1.0
    return 1.0 - min(edit_distance(rec, tgt), len(tgt)) / len(tgt)


class OcrReward:
    """Tesseract OCR reward.  ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` in [0, 1].

    Args:
        psm: tesseract page-segmentation mode (6: one uniform block of text).
        lang: tesseract language pack.
        workers: tesseract processes run at once.
        upscale: integer factor images are enlarged by (bicubic) before recognition;
            tesseract needs letters about 20+ pixels tall.
        timeout: seconds allowed per image.
        tesseract_cmd: the executable.
        omp_threads: ``OMP_THREAD_LIMIT`` for each tesseract process (1: run several
            processes instead of one multi-threaded one, which is faster for small images).

    The target may also be given per sample as ``metadata[i]["text"]``, which takes
    precedence over the prompt's quotes.
    """

    differentiable = False
    builds_cheaply = True  # validate builds it: a missing tesseract is found before training
    arg_ranges = {"psm": ((">=", 0), ("<=", 13)), "workers": ((">=", 1),), "upscale": ((">=", 1), ("<=", 16)),
                  "timeout": ((">", 0),), "omp_threads": ((">=", 1),)}

    def __init__(
        self,
        psm: int = 6,
        lang: str = "eng",
        workers: int = 1,
        upscale: int = 1,
        timeout: float = 30.0,
        tesseract_cmd: str = "tesseract",
        omp_threads: int = 1,
    ) -> None:
        exe = shutil.which(tesseract_cmd)
        if exe is None:
            raise RewardError(
                f"ocr reward: the '{tesseract_cmd}' executable was not found "
                "(Debian/Ubuntu: apt-get install tesseract-ocr tesseract-ocr-eng)"
            )
        if workers < 1 or upscale < 1:
            raise ValueError("ocr reward: workers and upscale must be >= 1")
        self.cmd = [exe, "stdin", "stdout", "--psm", str(int(psm)), "-l", lang]
        self.workers = int(workers)
        self.upscale = int(upscale)
        self.timeout = float(timeout)
        self.env = {**os.environ, "OMP_THREAD_LIMIT": str(int(omp_threads))}

    def recognise(self, image: Image.Image) -> str:
        """Text tesseract reads in one PIL image."""
        if self.upscale > 1:
            image = image.resize((image.width * self.upscale, image.height * self.upscale), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        try:
            proc = subprocess.run(self.cmd, input=buf.getvalue(), capture_output=True, timeout=self.timeout,
                                  env=self.env)
        except subprocess.TimeoutExpired as err:
            raise RewardError(f"ocr reward: tesseract took more than {self.timeout} s") from err
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RewardError(f"ocr reward: tesseract failed: {msg[-1] if msg else proc.returncode}")
        return proc.stdout.decode("utf-8", errors="replace")

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        check_images(images, "ocr")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"ocr reward: {len(prompts)} prompts for {images.shape[0]} images")
        metadata = metadata or [{} for _ in prompts]
        targets = [
            str(m["text"]) if isinstance(m, dict) and "text" in m else extract_target(p)
            for p, m in zip(prompts, metadata)
        ]
        pils = to_pil(images)
        if self.workers > 1 and len(pils) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                texts = list(pool.map(self.recognise, pils))
        else:
            texts = [self.recognise(img) for img in pils]
        scores = [ocr_score(text, target) for text, target in zip(texts, targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
