"""OCR (real PP-OCR on onnxruntime, real tesseract) and DDPO JPEG rewards."""

from __future__ import annotations

import importlib.util
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from advantageflow.cli import main
from advantageflow.rewards import REWARDS, RewardError, build_reward
from advantageflow.rewards.imageio import from_uint8, to_pil
from advantageflow.rewards.ocr import edit_distance, extract_target, normalise_text, ocr_score
from tests.conftest import REPO

HAVE_TESSERACT = shutil.which("tesseract") is not None
needs_tesseract = pytest.mark.skipif(
    not HAVE_TESSERACT, reason="the 'tesseract' binary is not installed (apt-get install tesseract-ocr)"
)
HAVE_PPOCR = importlib.util.find_spec("rapidocr_onnxruntime") is not None
needs_ppocr = pytest.mark.skipif(
    not HAVE_PPOCR, reason="rapidocr-onnxruntime is not installed (pip install 'advantageflow[ocr]')"
)
TESSERACT = {"backend": "tesseract"}


def render(texts: list[str], size: tuple[int, int] = (320, 72), font_size: int = 34) -> torch.Tensor:
    """``(B, 3, H, W)`` black text on white, DejaVu/PIL default font at ``font_size`` px."""
    font = ImageFont.load_default(size=font_size)
    arrays = []
    for text in texts:
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((10, (size[1] - font_size) // 2 - 4), text, fill="black", font=font)
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
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
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


@pytest.fixture(scope="module")
def ppocr():
    """One PP-OCR reward for the module (its models take a few seconds to load)."""
    return build_reward("ocr", {"backend": "ppocr"})


@needs_ppocr
def test_ppocr_is_the_default_and_reads_a_rendered_word(ppocr):
    assert build_reward("ocr").backend == "ppocr"
    assert ppocr.differentiable is False
    images = render(["Hello World", "SALE"], size=(256, 64), font_size=30)
    assert normalise_text(ppocr.recognise(to_pil(images)[0])) == "helloworld"
    prompts = ['a sign that says "hello world"', 'a sign that says "sale"']
    assert ppocr(images, prompts, [{}, {}]).tolist() == [1.0, 1.0]
    # Wrong text scores lower, by the edit distance: "helloword" is one deletion away.
    near = ['a sign that says "hello word"', 'a sign that says "sole"']
    assert ppocr(images, near, [{}, {}]).tolist() == pytest.approx([1 - 1 / 9, 1 - 1 / 4])
    far = ppocr(images, ['"goodbye moon"', '"open"'], [{}, {}])
    assert (far <= 0.5).all(), far
    # metadata["text"] overrides the prompt's quotes
    assert ppocr(images[:1], ['"zzz"'], [{"text": "hello world"}]).tolist() == [1.0]


def test_ocr_backend_is_checked_and_its_options_named(capsys):
    with pytest.raises(ValueError, match=r"unknown backend 'paddle'.*\(options: ppocr, tesseract\)"):
        build_reward("ocr", {"backend": "paddle"})
    with pytest.raises(ValueError, match="did you mean 'tesseract'"):
        build_reward("ocr", {"backend": "tesseract5"})
    with pytest.raises(ValueError, match="psm apply to backend 'tesseract' only"):
        build_reward("ocr", {"backend": "ppocr", "psm": 7})
    # validate names the key and the options in one line
    cfg = str(REPO / "configs" / "sd3_tiny_awm.yaml")
    assert main(["validate", cfg, "reward.name=ocr", "reward.args.backend=paddle"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'reward.args': reward 'ocr'" in err and "options: ppocr, tesseract" in err, err


@needs_tesseract
def test_ocr_with_real_tesseract():
    reward = build_reward("ocr", TESSERACT)
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
    serial = build_reward("ocr", TESSERACT)(images, prompts, [{}] * 3)
    parallel = build_reward("ocr", {**TESSERACT, "workers": 3})(images, prompts, [{}] * 3)
    assert torch.equal(serial, parallel)
    assert serial.mean() > 0.6


def test_ocr_bad_input():
    if not HAVE_TESSERACT:
        pytest.skip("the 'tesseract' binary is not installed")
    reward = build_reward("ocr", TESSERACT)
    with pytest.raises(RewardError, match=r"\(B, 3, H, W\)"):
        reward(torch.zeros(2, 2), ['"a"', '"b"'], [{}, {}])
    with pytest.raises(RewardError, match="executable"):
        build_reward("ocr", {**TESSERACT, "tesseract_cmd": "no-such-tesseract-binary"})


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
    for name in [
        "ocr",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "clip_score",
        "pickscore",
        "aesthetic",
        "hpsv2",
        "imagereward",
        "remote",
        "vlm_judge",
        "toy2d_modes",
        "toy2d_smooth",
    ]:
        assert name in REWARDS
