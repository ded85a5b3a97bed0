"""The command line: one clear line for bad input, and the subcommands on the toy task."""

from __future__ import annotations

import json
import subprocess
import sys

from advantageflow.cli import main
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def test_validate_ok_and_bad_key(capsys):
    assert main(["validate", TOY]) == 0
    assert "ok: algo=advantageflow" in capsys.readouterr().out
    assert main(["validate", TOY, "train.lr_rate=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'train.lr_rate'" in err[0] and "did you mean 'train.lr'" in err[0]


def test_missing_config_file_is_one_line(capsys):
    assert main(["validate", "nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "advantageflow: error: config file 'nope.yaml' does not exist"


def test_train_eval_sample_on_toy(tmp_path, toy_overrides, capsys):
    run = tmp_path / "run"
    args = [TOY, *toy_overrides, "train.epochs=3", "eval.every=0", "checkpoint.every=3"]
    assert main(["train", *args, "--run-dir", str(run)]) == 0
    assert "[advantageflow] advantageflow on toy2d" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--json", "log.progress=false"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "eval/rewarded_fraction" in report["metrics"] and report["checkpoint"].endswith("ckpt-000003")
    assert main(["sample", "--checkpoint", str(run), "--num", "16", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").exists()
    # --resume of a finished run is a no-op that still succeeds
    assert main(["train", *args, "--run-dir", str(run), "--resume"]) == 0


def test_bad_checkpoint_path_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "neither a checkpoint nor a run folder" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "advantageflow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "serve-reward" in out.stdout
