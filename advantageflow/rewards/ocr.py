"""OCR reward (the Flow-GRPO / AWM text-rendering reward), PP-OCR or tesseract.

Definition (Flow-GRPO, Liu et al. 2025, Sec. 5 "Visual text rendering"; same in AWM):
the target text is what lies between the first pair of double quotes in the prompt; both
target and recognised text are lower-cased with spaces removed; the reward is 1 when the
recognised text contains the target, else ``1 - min(d, n) / n`` with ``d`` the Levenshtein
distance between recognised text and target and ``n`` the target's length.

Engines (``backend``):

* ``ppocr`` (default): PP-OCRv4 detection + recognition, the models the authors' PaddleOCR
  2.x runs, executed by ``rapidocr-onnxruntime`` (ONNX models shipped in its wheel; CPU,
  offline).  As in Flow-GRPO's ``OcrScorer`` the angle classifier is off and the recognised
  lines are concatenated in the engine's reading order.
* ``tesseract``: Debian's ``tesseract`` command line, one process per image.

Not differentiable.
"""

from __future__ import annotations

import importlib.util
import io
import os
import queue
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from advantageflow.registry import closest
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


BACKENDS = ("ppocr", "tesseract")
PPOCR_PACKAGE = "rapidocr_onnxruntime"
# Tesseract-only arguments and their defaults (None in the signature: "not given").
TESSERACT_DEFAULTS = {"psm": 6, "lang": "eng", "tesseract_cmd": "tesseract"}


def check_backend(backend: str) -> str:
    """``backend`` if known, else a ``ValueError`` naming the options (and the closest one)."""
    if backend in BACKENDS:
        return backend
    hint = closest(str(backend), list(BACKENDS))
    more = f"; did you mean '{hint}'?" if hint else ""
    raise ValueError(f"ocr reward: unknown backend '{backend}'{more} (options: {', '.join(BACKENDS)})")


class TesseractEngine:
    """``recognise(PIL image) -> str`` with the ``tesseract`` command line (thread-safe:
    one process per call)."""

    def __init__(self, psm: int, lang: str, timeout: float, tesseract_cmd: str, omp_threads: int) -> None:
        exe = shutil.which(tesseract_cmd)
        if exe is None:
            raise RewardError(
                f"ocr reward: the '{tesseract_cmd}' executable was not found "
                "(Debian/Ubuntu: apt-get install tesseract-ocr tesseract-ocr-eng)"
            )
        self.cmd = [exe, "stdin", "stdout", "--psm", str(int(psm)), "-l", lang]
        self.timeout = float(timeout)
        # OMP_THREAD_LIMIT 1: several processes beat one multi-threaded one on small images.
        self.env = {**os.environ, "OMP_THREAD_LIMIT": str(int(omp_threads))}

    def recognise(self, image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        try:
            proc = subprocess.run(
                self.cmd, input=buf.getvalue(), capture_output=True, timeout=self.timeout, env=self.env
            )
        except subprocess.TimeoutExpired as err:
            raise RewardError(f"ocr reward: tesseract took more than {self.timeout} s") from err
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RewardError(f"ocr reward: tesseract failed: {msg[-1] if msg else proc.returncode}")
        return proc.stdout.decode("utf-8", errors="replace")


class PPOcrEngine:
    """``recognise(PIL image) -> str`` with PP-OCRv4 (det + rec, no angle classifier) on
    onnxruntime.  One RapidOCR instance per concurrent caller, made on first use (the
    constructor only checks that the package is installed, so ``validate`` stays cheap)."""

    def __init__(self, omp_threads: int, min_confidence: float) -> None:
        if importlib.util.find_spec(PPOCR_PACKAGE) is None:
            raise RewardError(
                "ocr reward: backend 'ppocr' needs the 'rapidocr-onnxruntime' package "
                "(pip install 'advantageflow[ocr]' or pip install rapidocr-onnxruntime), "
                "or set backend: tesseract"
            )
        self.omp_threads, self.min_confidence = int(omp_threads), float(min_confidence)
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _engine(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            from rapidocr_onnxruntime import RapidOCR

            # PaddleOCR 2.x's defaults, which Flow-GRPO runs: drop_score 0.5, detection input
            # longest side at most 960 (RapidOCR's own default upsizes the shortest to 736),
            # angle classifier off.
            return RapidOCR(
                use_cls=False,
                text_score=self.min_confidence,
                det_limit_type="max",
                det_limit_side_len=960,
                intra_op_num_threads=self.omp_threads,
                inter_op_num_threads=1,
            )

    def recognise(self, image: Image.Image) -> str:
        engine = self._engine()
        try:
            result, _ = engine(np.asarray(image.convert("RGB"))[:, :, ::-1].copy(), use_cls=False)
        finally:
            self._idle.put(engine)
        # Rows are [box, text, confidence] in reading order (top-to-bottom, left-to-right).
        return "".join(str(row[1]) for row in result or [])


class OcrReward:
    """OCR reward.  ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` in [0, 1].

    Args:
        backend: ``ppocr`` (PP-OCRv4 on onnxruntime, the authors' engine family; default) or
            ``tesseract``.
        workers: images recognised at once (threads; tesseract: processes).
        upscale: integer factor images are enlarged by (bicubic) before recognition;
            tesseract needs letters about 20+ pixels tall.
        timeout: seconds allowed per image (tesseract).
        omp_threads: threads of each recognition (tesseract's ``OMP_THREAD_LIMIT``,
            onnxruntime's intra-op threads for ppocr); 1 with several workers is fastest.
        min_confidence: ppocr only: recognised lines below this confidence are dropped
            (PaddleOCR's ``drop_score`` default, 0.5).
        psm, lang, tesseract_cmd: tesseract only (defaults 6, ``eng``, ``tesseract``);
            giving them with ``backend: ppocr`` is an error.

    The target may also be given per sample as ``metadata[i]["text"]``, which takes
    precedence over the prompt's quotes.
    """

    differentiable = False
    builds_cheaply = True  # validate builds it: a missing engine is found before training
    arg_ranges = {
        "psm": ((">=", 0), ("<=", 13)),
        "workers": ((">=", 1),),
        "upscale": ((">=", 1), ("<=", 16)),
        "timeout": ((">", 0),),
        "omp_threads": ((">=", 1),),
        "min_confidence": ((">=", 0), ("<=", 1)),
    }

    def __init__(
        self,
        backend: str = "ppocr",
        workers: int = 1,
        upscale: int = 1,
        timeout: float = 30.0,
        omp_threads: int = 1,
        min_confidence: float = 0.5,
        psm: int | None = None,
        lang: str | None = None,
        tesseract_cmd: str | None = None,
    ) -> None:
        self.backend = check_backend(backend)
        if workers < 1 or upscale < 1:
            raise ValueError("ocr reward: workers and upscale must be >= 1")
        given = {"psm": psm, "lang": lang, "tesseract_cmd": tesseract_cmd}
        if self.backend == "tesseract":
            opts = {k: TESSERACT_DEFAULTS[k] if v is None else v for k, v in given.items()}
            self.engine: Any = TesseractEngine(opts["psm"], opts["lang"], timeout, opts["tesseract_cmd"], omp_threads)
        else:
            wrong = sorted(k for k, v in given.items() if v is not None)
            if wrong:
                raise ValueError(
                    f"ocr reward: {', '.join(wrong)} apply to backend 'tesseract' only; "
                    "set backend: tesseract or drop them"
                )
            self.engine = PPOcrEngine(omp_threads, min_confidence)
        self.workers = int(workers)
        self.upscale = int(upscale)

    def recognise(self, image: Image.Image) -> str:
        """Text the engine reads in one PIL image."""
        if self.upscale > 1:
            image = image.resize((image.width * self.upscale, image.height * self.upscale), Image.BICUBIC)
        return self.engine.recognise(image)

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
