"""The command line: one clear line for bad input, and the subcommands on the toy task."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

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


def test_version_flag_prints_the_package_version(capsys):
    import advantageflow

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"advantageflow {advantageflow.__version__}"


@pytest.mark.parametrize("command", ["", "train", "eval", "sample", "configs", "estimate-memory"])
def test_help_is_plain_text(capsys, command):
    """No reStructuredText from docstrings (``literal``, :class:`X`) in what --help prints."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: advantageflow" in out
    assert not re.search(r"``|:(class|func|mod|meth):`", out), out


def test_configs_lists_prints_and_copies_the_shipped_configs(tmp_path, capsys):
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert main(["configs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [p.stem for p in shipped]
    assert main(["configs", "toy2d_awm"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "toy2d_awm.yaml").read_text(encoding="utf-8")
    # one (the .yaml suffix is optional), then all of them
    assert main(["configs", "toy2d_awm.yaml", "--to", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["toy2d_awm.yaml"]
    assert main(["configs", "--to", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [p.name for p in shipped]
    assert all((tmp_path / "all" / p.name).read_bytes() == p.read_bytes() for p in shipped)


def test_configs_refuses_to_overwrite_and_names_unknown_configs(tmp_path, capsys):
    (tmp_path / "toy2d_awm.yaml").write_text("mine")
    assert main(["configs", "toy2d_ram", "toy2d_awm", "--to", str(tmp_path)]) == 2
    assert "toy2d_awm.yaml' exists (--force overwrites)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy2d_awm.yaml"]  # nothing written
    assert (tmp_path / "toy2d_awm.yaml").read_text() == "mine"
    assert main(["configs", "toy2d_awm", "--to", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "toy2d_awm.yaml").read_bytes() == (REPO / "configs" / "toy2d_awm.yaml").read_bytes()
    assert main(["configs", "toy2d_flow_grop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shipped config 'toy2d_flow_grop'; did you mean 'toy2d_flow_grpo'?" in err[0]


def test_output_into_a_closed_pipe_ends_quietly():
    """`advantageflow configs | head -1`: the reader has gone; no error line, SIGPIPE's status."""
    proc = subprocess.Popen([sys.executable, "-m", "advantageflow", "configs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # before the child has written anything: its first write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_validate_notes_settings_the_algorithms_authors_do_not_use(capsys):
    """An algorithm's conventions outside its section (EPG: no std in the advantage; AWM and
    DiffusionNFT: no CFG, one step per epoch) are noted with the key to change, not refused."""
    assert main(["validate", TOY, "algo=epg", "advantage.std=global", "sampler.guidance_scale=2.0"]) == 0
    out = capsys.readouterr().out
    assert "note: advantage.std is 'global'" in out and "advantage.std=none" in out
    assert "note: sampler.guidance_scale is 2.0" in out and out.rstrip().splitlines()[-1].startswith("ok: algo=epg")
    assert main(["validate", TOY, "algo=awm", "train.steps_per_epoch=2"]) == 0
    assert "train.steps_per_epoch=1" in capsys.readouterr().out
    for name in ("epg", "awm", "diffusion_nft"):  # the shipped configs follow their authors
        assert main(["validate", str(REPO / "configs" / f"toy2d_{name}.yaml")]) == 0
        assert "note:" not in capsys.readouterr().out


def test_sample_gives_the_evaluation_image_of_the_same_prompt_seed_and_index(tmp_path):
    """`advantageflow sample --index i` draws evaluation sample i's noise with the evaluation
    sampler: its PNGs are the evaluation's images of that slot (ShapesEval, shift and seed set
    away from their defaults so that both paths must read them)."""
    import numpy as np
    from PIL import Image

    from advantageflow.build import build_components
    from advantageflow.config import load_config
    from advantageflow.evaluation import evaluate_policy

    shapes = str(REPO / "configs" / "shapes_advantageflow.yaml")
    overrides = ["seed=5", "sampler.eval_steps=3", "sampler.shift=2.0", "eval.num_prompts=2"]
    overrides += ["eval.samples_per_prompt=2", "log.progress=false"]
    cfg = load_config(shapes, overrides)
    parts = build_components(cfg, "cpu")
    parts.policy.set_mode(training=False)
    result = evaluate_policy(parts.policy, parts.task, parts.reward, cfg)

    def sample(out, *options: str) -> list:
        prompt = result.prompts[2].text
        assert main(["sample", shapes, *overrides, "--prompt", prompt, *options, "--out", str(out)]) == 0
        return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("sample_*.png"))]

    # slot 1's two samples are evaluation samples 2 and 3
    for k, png in enumerate(sample(tmp_path / "s", "--index", "2", "--num", "2")):
        want = (result.images[2 + k].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
        assert np.array_equal(png, want)  # both sample with the training kernels
    # another seed is another image
    other = sample(tmp_path / "t", "--index", "3", "--num", "1", "--seed", "6")[0]
    assert not np.array_equal(other, np.asarray(Image.open(tmp_path / "s" / "sample_001.png"), dtype=np.int16))


def test_sample_refuses_a_negative_index(capsys):
    assert main(["sample", TOY, "--index", "-1", "--num", "1"]) == 2
    assert "--index >= 0" in capsys.readouterr().err


def test_eval_repeats_the_runs_own_evaluations_before_and_after(tmp_path, capsys):
    """`advantageflow eval` gives the numbers a run printed, to the last bit: with the run's config
    those of the base ("before"), with `--checkpoint RUN` those of the end ("after").  Both sample
    with the training kernels (oneDNN off: its convolutions differ from ATen's in the last bits,
    which the continuous `eval/diversity` shows even where no image's verdict flips)."""
    import torch

    from advantageflow.build import build_components
    from advantageflow.config import load_config
    from advantageflow.evaluation import evaluate_policy

    shapes = str(REPO / "configs" / "shapes_advantageflow.yaml")
    run = tmp_path / "run"
    overrides = ["train.epochs=1", "train.prompts_per_epoch=2", "train.group_size=2", "train.micro_batch_size=4",
                 "sampler.steps=2", "sampler.eval_steps=3", "eval.num_prompts=6", "eval.samples_per_prompt=2",
                 "eval.every=1", "checkpoint.every=1", "log.progress=false", "log.tensorboard=false",
                 "log.flops=false"]
    assert main(["train", shapes, *overrides, "--run-dir", str(run)]) == 0

    before = json.loads((run / "eval_before.json").read_text())["metrics"]
    after = json.loads((run / "eval_after.json").read_text())["metrics"]
    assert before["eval/diversity"] != after["eval/diversity"]  # one step moved the weights
    # the base through the evaluation `advantageflow eval` calls (its reward-hacking guards, 12 s
    # here, are left to the one CLI call below), in this process where oneDNN is on
    assert torch.backends.mkldnn.enabled
    cfg = load_config(shapes, overrides)
    parts = build_components(cfg, "cpu")
    parts.policy.set_mode(training=False)
    assert evaluate_policy(parts.policy, parts.task, parts.reward, cfg).metrics == before
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--json", "log.progress=false"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == after
