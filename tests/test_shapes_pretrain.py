"""`advantageflow pretrain shapes` (its main function) on a tiny model for a few steps."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from advantageflow.models.dit import ShapesDiTPolicy
from advantageflow.tasks.shapes.pretrain import main

TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--warmup", "2",
        "--eval-samples", "0", "--no-progress"]


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--minutes" in capsys.readouterr().out


def test_writes_a_loadable_asset_and_snapshots_equal_shorter_runs(tmp_path):
    long_dir, short_dir = tmp_path / "long", tmp_path / "short"
    assert main(["--steps", "4", "--save-every", "2", "--out", str(long_dir), *TINY]) == 0
    assert main(["--steps", "2", "--out", str(short_dir), *TINY]) == 0
    meta = json.loads((long_dir / "config.json").read_text())
    assert meta["pretrain"]["steps_done"] == 4 and meta["model"]["width"] == 32
    assert {"steps", "eval_steps", "guidance_scale"} <= set(meta["sampling"])
    snap_meta = json.loads((long_dir / "step_2" / "config.json").read_text())
    assert snap_meta["pretrain"]["steps"] == 2
    # constant learning rate after warm-up: the snapshot at step 2 is what --steps 2 saves
    snap = load_file(str(long_dir / "step_2" / "model.safetensors"))
    short = load_file(str(short_dir / "model.safetensors"))
    final = load_file(str(long_dir / "model.safetensors"))
    assert all((snap[k] == short[k]).all() for k in short)
    assert any((final[k] != short[k]).any() for k in short)
    policy = ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=str(long_dir)))
    assert policy.generate(["a red circle"], steps=2).shape == (1, 3, 32, 32)


def test_time_cap_stops_early_and_still_saves(tmp_path):
    assert main(["--steps", "1000", "--minutes", "0", "--out", str(tmp_path), *TINY]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["pretrain"]["steps_done"] == 1
