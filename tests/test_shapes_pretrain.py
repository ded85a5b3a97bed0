"""`advantageflow pretrain shapes` (its main function) on a tiny model for a few steps."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from advantageflow.models.dit import ShapesDiTPolicy
from advantageflow.tasks.shapes.evaluator import asset_sampler, sample_shapes_eval
from advantageflow.tasks.shapes.grammar import parse_prompt
from advantageflow.tasks.shapes.pretrain import (
    foreground_weights,
    lr_factor,
    main,
    sample_batch,
    tag_weights,
    velocity_mse,
)

TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--warmup", "2",
        "--eval-samples", "0", "--no-progress"]


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--minutes" in capsys.readouterr().out


def _position_share(weights) -> float:
    from advantageflow.tasks.shapes.scene import RELATIONS

    _, prompts = sample_batch(random.Random(0), 600, 0.0, weights=weights)
    return sum(any(f" {r} " in p for r in RELATIONS) for p in prompts) / len(prompts)


def test_tag_weights_set_how_often_each_tag_is_drawn():
    assert tag_weights("") is None and tag_weights("position=1") is None  # equal: the old stream
    weighted = tag_weights("position=5, color_attr=2")
    assert weighted == (1.0, 1.0, 1.0, 1.0, 5.0, 2.0)
    assert abs(_position_share(None) - 1 / 6) < 0.05  # position is the only tag with relations
    assert abs(_position_share(weighted) - 5 / 11) < 0.06


@pytest.mark.parametrize("bad", ["postion=2", "position", "position=0", "position=two"])
def test_bad_tag_weights_are_refused_with_the_tags(bad, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--tag-weights", bad])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--tag-weights" in err and ("color_attr" in err or "> 0" in err)


def test_writes_a_loadable_asset_with_snapshots(tmp_path):
    out = tmp_path / "run"
    assert main(["--steps", "4", "--save-every", "2", "--out", str(out), *TINY]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["pretrain"]["steps_done"] == 4 and meta["model"]["width"] == 32
    assert meta["pretrain"]["command"].startswith("advantageflow pretrain shapes --steps 4")
    assert {"steps", "eval_steps", "guidance_scale"} <= set(meta["sampling"])
    assert json.loads((out / "step_2" / "config.json").read_text())["pretrain"]["steps_done"] == 2
    assert not (out / "resume.pt").exists()  # removed once finished
    policy = ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=str(out)))
    images = sample_shapes_eval(policy, [parse_prompt("a red circle")], 1, asset_sampler(policy, steps=2))
    assert images.shape == (1, 3, 32, 32)


def test_text_segments_are_a_dit_option_recorded_in_the_asset(tmp_path):
    out = tmp_path / "run"
    assert main(["--steps", "2", "--text-segments", "--conv-channels", "8", "--out", str(out), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["text_segments"] is True
    assert "tok_seg.weight" in load_file(str(out / "model.safetensors"))
    with pytest.raises(SystemExit, match="DiT option"):
        main(["--text-segments", "--arch", "unet", "--out", str(tmp_path / "unet"), *TINY])


def test_learning_rate_warms_up_then_decays_by_a_cosine():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("network", [[], ["--arch", "unet", "--conv-channels", "8", "--time-sampling", "logit_normal"]],
                         ids=["dit", "unet_as_shipped"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, network):
    import advantageflow.tasks.shapes.pretrain as pretrain

    args = ["--steps", "6", "--resume-every", "2", *TINY, *network]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls = {"n": 0}
    real = pretrain.sample_batch

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the process is killed during step 5
        return real(*a, **k)

    monkeypatch.setattr(pretrain, "sample_batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "resume.pt").exists()
    monkeypatch.setattr(pretrain, "sample_batch", real)
    # other weight-changing arguments are refused, not silently mixed
    with pytest.raises(SystemExit, match="--lr 0.001 -> 0.002"):
        main([*args, "--lr", "0.002", "--out", str(tmp_path / "killed")])
    # a state saved before an argument existed resumes with that argument's default
    state_path = tmp_path / "killed" / "resume.pt"
    state = torch.load(state_path, weights_only=False)
    del state["args"]["tag_weights"]
    torch.save(state, state_path)
    # where it trains is not a weight-changing argument: the run resumes on another device
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "killed")]) == 0
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    meta = json.loads((tmp_path / "killed" / "config.json").read_text())
    assert meta["pretrain"]["resumed"] is True and meta["pretrain"]["steps_done"] == 6


def test_time_cap_stops_early_and_still_saves(tmp_path):
    assert main(["--steps", "1000", "--minutes", "1e-9", "--out", str(tmp_path), *TINY]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["pretrain"]["steps_done"] == 1


def test_foreground_weights_mark_the_objects_and_keep_the_loss_scale():
    import random

    x0, _ = sample_batch(random.Random(0), 4, 0.0)
    assert foreground_weights(x0, 0.0) is None
    w = foreground_weights(x0, 4.0)
    assert w.shape == (4, 1, 32, 32) and set(w.unique().tolist()) == {1.0, 5.0}
    lit = (x0 - x0[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1  # corner pixel = background
    assert bool((w[lit] == 5.0).all())  # every object pixel is weighted
    assert 0.05 < float((w > 1).float().mean()) < 0.5  # and the background mostly not
    err = torch.full((4, 3, 32, 32), 2.0)
    assert float(velocity_mse(err, torch.zeros_like(err), w)) == pytest.approx(4.0)
    assert float(velocity_mse(err, torch.zeros_like(err), None)) == pytest.approx(4.0)


def test_the_final_evaluation_records_the_sampler_it_used(tmp_path):
    out = tmp_path / "run"
    args = [a for a in TINY if a not in ("--eval-samples", "0")]
    assert main(["--steps", "2", "--eval-samples", "1", "--eval-steps", "2", "--out", str(out), *args]) == 0
    meta = json.loads((out / "config.json").read_text())
    used = meta["eval"]["sampler"]
    assert used == {
        "solver": "euler",
        "steps": 2,
        "shift": 1.0,
        "guidance_scale": 1.0,
        "samples_per_prompt": 1,
        "seed": 0,
    }
    assert 0.0 <= meta["eval"]["strict"] <= 1.0 and "diversity" not in meta["eval"]


def test_guided_target_is_cfg_for_prompted_rows_and_unconditional_for_empty_ones():
    from advantageflow.tasks.shapes.pretrain import guided_target

    class Linear(torch.nn.Module):
        """v = x * (1 + t) + sum(tokens): conditional and unconditional velocities differ."""

        def forward(self, x, t, tokens):
            return x * (1 + t.view(-1, 1, 1, 1)) + tokens.sum(dim=1).view(-1, 1, 1, 1).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 4, 4, generator=g), torch.rand(3, generator=g)
    tokens = torch.tensor([[2, 3], [0, 0], [1, 0]])
    empty = torch.zeros_like(tokens)
    teacher = Linear()
    v_c, v_u = teacher(x, t, tokens), teacher(x, t, empty)
    got = guided_target(teacher, x, t, tokens, empty, [True, False, True], 3.0)
    assert torch.allclose(got[0], v_u[0] + 3.0 * (v_c[0] - v_u[0])) and torch.allclose(got[2], v_u[2] + 3 * 1.0)
    assert torch.equal(got[1], v_u[1])  # an empty prompt keeps the unconditional velocity
    assert torch.allclose(guided_target(teacher, x, t, tokens, empty, [True] * 3, 1.0), v_c)  # scale 1 = v_c


def test_guidance_distillation_starts_from_its_teacher_and_needs_one(tmp_path):
    base = tmp_path / "base"
    # a teacher whose zero-initialised output layer has moved (EMA off), so its velocity is not 0
    assert main(["--steps", "5", "--lr", "1e-2", "--ema", "0", "--out", str(base), *TINY]) == 0
    with pytest.raises(SystemExit, match="needs --init"):
        main(["--steps", "2", "--distill-guidance", "3", "--out", str(tmp_path / "x"), *TINY])
    out = tmp_path / "distilled"
    assert main(["--steps", "2", "--init", str(base), "--distill-guidance", "3", "--lr", "1e-3",
                 "--out", str(out), *TINY]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["pretrain"]["distill_guidance"] == 3.0 and meta["sampling"]["guidance_scale"] == 1.0
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pretraining_on_a_gpu_sees_the_same_data_as_on_the_cpu(tmp_path):
    """``--device cuda`` draws the same renders, noise and times on the CPU: the first steps'
    losses agree with the CPU run's to float rounding (TF32 and kernel order aside)."""
    for device in ("cpu", "cuda"):
        assert main(["--steps", "3", "--device", device, "--out", str(tmp_path / device), *TINY]) == 0
    cpu, gpu = (json.loads((tmp_path / d / "config.json").read_text())["pretrain"]["final_loss"]
                for d in ("cpu", "cuda"))
    assert gpu == pytest.approx(cpu, rel=1e-2)
