"""Images in the logs (``log.image_every``): PNG grids in the run folder, TensorBoard image
events and a Weights & Biases offline run, each read back from what the run wrote."""

from __future__ import annotations

import io
import json
import struct
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from advantageflow.config import load_config
from advantageflow.configbase import ConfigError
from advantageflow.imagelog import IMAGE_TAG, image_due, pick_rows, render_grid, start_wandb
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")
# The shipped ShapesDiT, shrunk: 2 prompts x 4 samples per epoch, 4 sampler steps, no evaluation.
SHAPES_QUICK = [
    "train.epochs=2",
    "train.prompts_per_epoch=2",
    "train.group_size=4",
    "train.steps_per_epoch=1",
    "sampler.steps=4",
    "eval.every=0",
    "log.progress=false",
    "log.image_prompts=2",
    "log.image_samples=3",
]


def test_pick_rows_takes_the_first_samples_of_the_first_groups():
    groups = torch.tensor([5, 5, 5, 2, 2, 2, 9, 9])
    assert pick_rows(groups, n_prompts=2, n_samples=2) == [[0, 1], [3, 4]]
    assert pick_rows(groups, n_prompts=5, n_samples=5) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [image_due(0, e) for e in (1, 2, 3)] == [False, False, False]
    assert [image_due(2, e) for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_grid_shows_every_sample_with_a_caption():
    images = torch.zeros(4, 3, 8, 8)
    images[1] = 1.0  # one white tile among black ones
    grid = render_grid(images, [[0, 1], [2, 3]], ["a red cat", "", "two circles", ""], torch.tensor([0.1, 0.9, 0, 1]))
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    black = (grid.sum(axis=2) == 0).sum()
    assert black >= 3 * (8 * 16) ** 2  # three 128 x 128 black tiles (scaled x16)
    blue = (grid[..., 2].astype(int) - grid[..., 0] > 40).sum()
    assert blue > 0  # the reward captions (dark blue)


def test_shapes_run_writes_png_grids_and_tensorboard_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = load_config(None, SHAPES_QUICK + ["log.image_every=1", "log.tensorboard=true"])
    train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    pngs = sorted((run / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch_0001.png", "epoch_0002.png"]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={IMAGES: 0})
    acc.Reload()
    events = acc.Images(IMAGE_TAG)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert [e.step for e in events] == steps  # one image per epoch, at the epoch's optimizer step
    for event, png in zip(events, pngs):
        shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(shown, np.asarray(Image.open(png).convert("RGB")))
    # 2 prompts x 3 samples of 32 x 32 pixels, scaled x4: at least 6 tiles of 128 x 128.
    arr = np.asarray(Image.open(pngs[0]))
    assert arr.shape[0] >= 2 * 128 and arr.shape[1] >= 3 * 128


def test_toy_run_draws_a_scatter_only_on_due_epochs(tmp_path, toy_overrides):
    cfg = load_config(TOY, toy_overrides + ["train.epochs=2", "eval.every=0", "log.image_every=2"])
    train(cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "images").glob("*.png")] == ["epoch_0002.png"]
    cfg = load_config(TOY, toy_overrides + ["train.epochs=1", "eval.every=0", "log.image_every=0"])
    train(cfg, tmp_path / "never")
    assert not (tmp_path / "never" / "images").exists()


def _wandb_history(run_root) -> dict[int, dict]:
    """``{step: {key: value}}`` from the offline run's ``.wandb`` file: wandb's LevelDB-style log
    (a 7-byte ``:W&B`` header, 32 KiB blocks of records with a 7-byte ``crc, length, type``
    header; type 1 full, 2/3/4 first/middle/last part) of ``wandb.proto`` ``Record`` messages.
    Nested values (images) become dicts."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_root.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, part, history = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(part)
        part = b""
        if record.WhichOneof("record_type") != "history":
            continue
        row = history.setdefault(record.history.step.num, {})
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
    return history


def _wandb_history_with(run_root, steps: set[int], timeout_s: float) -> dict[int, dict]:
    """:func:`_wandb_history` once it holds ``steps`` (or the deadline passed); a log still being
    written may end in a cut record, read again."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            history = _wandb_history(run_root)
        except DecodeError:
            history = {}
        if steps <= set(history) or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def test_wandb_offline_run_holds_the_scalars_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        None,
        SHAPES_QUICK + ["log.image_every=2", "log.tensorboard=false", "log.wandb=true", "log.wandb_project=af-test"],
    )
    train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    # wandb's service process writes the .wandb log.  Once, in the full suite under xdist, step 1
    # was missing when it was read (not reproduced in 15 runs alone or under load; cause not
    # established): if it is a late write, this waits up to 30 s for it before calling it missing.
    history = _wandb_history_with(run, set(rows), timeout_s=30.0)
    missing = sorted(set(rows) - set(history))
    assert not missing, f"steps in metrics.jsonl but not in the W&B log: {missing}"
    for step, row in rows.items():
        assert history[step]["reward/mean"] == pytest.approx(row["reward/mean"])
        assert history[step]["loss/total"] == pytest.approx(row["loss/total"])
    image = history[max(rows)][IMAGE_TAG]
    assert image["_type"] == "image-file" and "epoch 2" in image["caption"]
    assert all(IMAGE_TAG not in history[s] for s in rows if s != max(rows))  # image_every=2: epoch 2 only
    (media,) = run.glob("wandb/offline-run-*/files/" + image["path"])
    png = np.asarray(Image.open(media).convert("RGB"))
    np.testing.assert_array_equal(png, np.asarray(Image.open(run / "images" / "epoch_0002.png").convert("RGB")))
    assert json.loads((run / "wandb_run.json").read_text())["project"] == "af-test"


def test_wandb_without_the_package_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    cfg = load_config(None, SHAPES_QUICK + ["log.wandb=true"])
    with pytest.raises(ConfigError, match="pip install 'advantageflow\\[wandb\\]'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ImportError, match="log.wandb is true"):
        start_wandb(tmp_path, "p", {})
