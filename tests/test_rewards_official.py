"""Official HPSv2 / ImageReward checkpoint files through our scorers vs the official code.

``tests/reference_rewards.py`` (a separate process, see its docstring for why) builds tiny
random models with the official architecture code (OpenCLIP; ImageReward's BLIP), saves them
in the official checkpoint formats and scores PNG files with the official scoring code.  Here
the same files go through the ``hpsv2`` / ``imagereward`` rewards (converted on load, or by
``advantageflow convert-reward``) and the scores must agree to 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from advantageflow.rewards import RewardError, build_reward  # noqa: E402
from tests.reference_rewards import REFERENCE_DIR  # noqa: E402

HERE = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REFERENCE_DIR / "open_clip").is_dir() or not (REFERENCE_DIR / "ImageReward").is_dir(),
        reason=f"official reward packages not installed in {REFERENCE_DIR} (scripts/setup.sh installs them)",
    ),
]

PROMPTS = [
    "a photo of a cat",
    "Two DOGS playing in the park!",
    "a sign that says “hello” &amp;  goodbye",  # curly quotes, an HTML entity, two spaces: OpenCLIP cleans them
    "an astronaut riding a horse, " + "highly detailed, " * 30,  # past 77 CLIP tokens: truncated
]


def write_images(folder: Path, size: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``len(PROMPTS)`` random 8-bit RGB PNGs and the same pixels as ``(B, 3, H, W)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    arrays = rng.integers(0, 256, (len(PROMPTS), size, size, 3), dtype=np.uint8)
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return paths, torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def run_reference(kind: str, folder: Path, paths: list[str]) -> dict:
    spec = folder / f"{kind}.json"
    spec.write_text(json.dumps({"kind": kind, "workdir": str(folder), "images": paths, "prompts": PROMPTS, "seed": 0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(HERE / "reference_rewards.py"), str(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps_official")
    paths, x = write_images(folder, 224, seed=0)
    return run_reference("hpsv2", folder, paths), x


@pytest.fixture(scope="module")
def image_reward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward_official")
    paths, x = write_images(folder, 224, seed=1)
    return run_reference("imagereward", folder, paths), x


def test_hpsv2_checkpoint_file_matches_official(hps):
    ref, x = hps
    args = {"path": ref["checkpoint"], "model_config": ref["config"], "processor_path": ref["bpe"]}
    got = build_reward("hpsv2", args)(x, PROMPTS, [{}] * len(PROMPTS))
    expected = torch.tensor(ref["scores"])
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert expected.std() > 0.01  # the scores differ between pairs: the comparison has teeth
    # the same weights as DistributedDataParallel training saves them ("module." prefixes)
    ddp = build_reward("hpsv2", {**args, "path": ref["ddp_checkpoint"]})(x, PROMPTS, [{}] * len(PROMPTS))
    assert torch.allclose(ddp, got, atol=1e-6)


def test_hpsv2_tokenizer_matches_openclip(hps):
    pytest.importorskip("ftfy", reason="OpenCLIP's clean-up needs ftfy (pip install 'advantageflow[official-rewards]')")
    from advantageflow.rewards.convert import clip_tokenizer, openclip_clean

    ref, _ = hps
    prompts = [openclip_clean(p) for p in PROMPTS]
    ours = clip_tokenizer(ref["bpe"])(prompts, padding="max_length", truncation=True, max_length=77)["input_ids"]
    for mine, theirs in zip(ours, ref["tokens"]):
        end = theirs.index(49407) + 1  # OpenCLIP pads with 0 after <end_of_text>, we with <end_of_text>
        assert mine[:end] == theirs[:end]
    assert ref["tokens"][3][76] == 49407 and ref["tokens"][3][75] != 49407  # the long prompt was truncated


def test_hpsv2_converted_folder_matches_official(hps, tmp_path):
    from advantageflow.cli import main

    ref, x = hps
    out = tmp_path / "hps_hf"
    assert (
        main(
            [
                "convert-reward",
                "hpsv2",
                ref["checkpoint"],
                str(out),
                "--model-config",
                ref["config"],
                "--tokenizer",
                ref["bpe"],
            ]
        )
        == 0
    )
    got = build_reward("hpsv2", {"path": str(out)})(x, PROMPTS, [{}] * len(PROMPTS))
    assert torch.allclose(got, torch.tensor(ref["scores"]), atol=1e-4)


def test_hpsv2_wrong_model_config_is_refused(hps):
    ref, _ = hps
    with pytest.raises(RewardError, match="vision width 96 in the checkpoint, 1280 in the model config"):
        build_reward("hpsv2", {"path": ref["checkpoint"], "processor_path": ref["bpe"]})  # ViT-H-14 by default


def test_imagereward_checkpoint_file_matches_official(image_reward):
    ref, x = image_reward
    args = {"path": ref["checkpoint"], "med_config": ref["med_config"], "processor_path": ref["tokenizer"]}
    reward = build_reward("imagereward", args)
    got = reward(x, PROMPTS, [{}] * len(PROMPTS))
    expected = torch.tensor(ref["scores"])
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert expected.std() > 0.01
    # cross-attention reads the image: the same prompt on other images scores differently
    other = reward(x.flip(0), PROMPTS, [{}] * len(PROMPTS))
    assert (other - got).abs().max() > 1e-3


def test_imagereward_converted_folder_matches_official(image_reward, tmp_path):
    from advantageflow.cli import main

    ref, x = image_reward
    out = tmp_path / "ir_hf"
    assert (
        main(
            [
                "convert-reward",
                "imagereward",
                ref["checkpoint"],
                str(out),
                "--med-config",
                ref["med_config"],
                "--tokenizer",
                ref["tokenizer"],
            ]
        )
        == 0
    )
    assert (out / "imagereward_head.safetensors").is_file()
    got = build_reward("imagereward", {"path": str(out)})(x, PROMPTS, [{}] * len(PROMPTS))
    assert torch.allclose(got, torch.tensor(ref["scores"]), atol=1e-4)


def test_imagereward_needs_med_config(image_reward, tmp_path):
    ref, _ = image_reward
    lone = tmp_path / "ImageReward.pt"
    lone.write_bytes(Path(ref["checkpoint"]).read_bytes())
    with pytest.raises(RewardError, match="med_config.json not found"):
        build_reward("imagereward", {"path": str(lone), "processor_path": ref["tokenizer"]})
