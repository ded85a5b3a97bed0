"""OCR (real tesseract) and DDPO JPEG rewards."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from advantageflow.rewards import REWARDS, RewardError, build_reward
from advantageflow.rewards.imageio import from_uint8
from advantageflow.rewards.ocr import edit_distance, extract_target, normalise_text, ocr_score

HAVE_TESSERACT = shutil.which("tesseract") is not None
needs_tesseract = pytest.mark.skipif(
    not HAVE_TESSERACT, reason="the 'tesseract' binary is not installed (apt-get install tesseract-ocr)"
)


def render(texts: list[str], size: tuple[int, int] = (320, 72)) -> torch.Tensor:
    """``(B, 3, H, W)`` black text on white, DejaVu/PIL default font at 34 px."""
    font = ImageFont.load_default(size=34)
    arrays = []
    for text in texts:
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((10, 14), text, fill="black", font=font)
        arrays.append(np.asarray(img))
    return from_uint8(np.stack(arrays))


def _dp_distance(a: str, b: str) -> int:
    """Independent full-table Wagner-Fischer, for checking the rolling-row version."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return table[-1][-1]


def test_edit_distance_matches_full_table():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        b = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        assert edit_distance(a, b) == _dp_distance(a, b)
    assert edit_distance("kitten", "sitting") == 3


def test_ocr_score_definition():
    assert extract_target('a sign that says "Hello World" and "other"') == "Hello World"
    assert normalise_text(" He llo\nW ") == "hellow"
    assert ocr_score("xx HELLO world yy", "hello world") == 1.0  # containment
    assert ocr_score("hellp", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("", "hello") == 0.0  # distance capped at len(target)
    assert ocr_score("a completely different sentence", "hi") == 0.0
    with pytest.raises(RewardError, match="double quotes"):
        extract_target("no quotes here")


@needs_tesseract
def test_ocr_with_real_tesseract():
    reward = build_reward("ocr")
    assert reward.differentiable is False
    images = render(["OPEN DOOR", "OPEN DOOR"])
    prompts = ['a sign that says "open door"', 'a sign that says "yellow"']
    scores = reward(images, prompts, [{}, {}])
    assert scores.shape == (2,)
    assert scores[0] >= 0.9, scores
    assert scores[1] <= scores[0] - 0.5, scores
    # metadata["text"] overrides the prompt's quotes
    again = reward(images[:1], ['"zzz"'], [{"text": "open door"}])
    assert again[0] == scores[0]


@needs_tesseract
def test_ocr_parallel_workers_agree():
    images = render(["CAT", "DOG", "BIRD"])
    prompts = ['"cat"', '"dog"', '"bird"']
    serial = build_reward("ocr")(images, prompts, [{}] * 3)
    parallel = build_reward("ocr", {"workers": 3})(images, prompts, [{}] * 3)
    assert torch.equal(serial, parallel)
    assert serial.mean() > 0.6


def test_ocr_bad_input():
    if not HAVE_TESSERACT:
        pytest.skip("the 'tesseract' binary is not installed")
    reward = build_reward("ocr")
    with pytest.raises(RewardError, match=r"\(B, 3, H, W\)"):
        reward(torch.zeros(2, 2), ['"a"', '"b"'], [{}, {}])
    with pytest.raises(RewardError, match="executable"):
        build_reward("ocr", {"tesseract_cmd": "no-such-tesseract-binary"})


def _jpeg_kb(array: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_jpeg_rewards_definition_and_order():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=gen)
    images = torch.cat([flat, noise])
    comp = build_reward("jpeg_compressibility")(images, ["", ""], [{}, {}])
    incomp = build_reward("jpeg_incompressibility")(images, ["", ""], [{}, {}])
    # independent computation from the uint8 arrays, bytes / 1000
    arrays = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    expected = torch.tensor([_jpeg_kb(a) for a in arrays])
    assert torch.allclose(incomp, expected)
    assert torch.equal(comp, -incomp)
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    assert incomp[1] > 5 * incomp[0]
    # lower quality -> smaller files
    low = build_reward("jpeg_incompressibility", {"quality": 30})(noise, [""], [{}])
    assert low[0] < incomp[1]


def test_jpeg_args_checked():
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", {"quality": 0})
    with pytest.raises(ValueError, match="did you mean 'quality'"):
        build_reward("jpeg_compressibility", {"qualty": 90})


def test_builtins_registered():
    for name in ["ocr", "jpeg_compressibility", "jpeg_incompressibility", "clip_score", "pickscore",
                 "aesthetic", "hpsv2", "imagereward", "remote", "toy2d_modes", "toy2d_smooth"]:
        assert name in REWARDS
