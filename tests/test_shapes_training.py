"""A short AdvantageFlow run on ShapesEval from the shipped model (the main job, shrunk)."""

from __future__ import annotations

import json

from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train


def test_main_job_smoke_run_on_a_few_prompts(tmp_path):
    cfg = load_config(None, [
        "train.epochs=2", "train.prompts_per_epoch=2", "train.group_size=4", "train.steps_per_epoch=1",
        "sampler.steps=4", "sampler.eval_steps=4", "eval.every=2", "eval.num_prompts=6",
        "eval.samples_per_prompt=2", "log.tensorboard=false", "log.progress=false",
    ])
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[1]["reward/mean"] <= 1.0 and "reward/shapes_eval/strict" in rows[1]
    assert "eval/strict/counting" in result.eval_after and "eval/partial" in result.eval_before
    assert (run / "samples_before.png").exists() and (run / "samples_after.png").exists()
    after = json.loads((run / "eval_after.json").read_text())
    assert "eval/strict" in after["metrics"]
    summary = (run / "summary.txt").read_text()
    assert " strict " in summary and " strict_exact " in summary  # the over-drawing guard beside the headline
    assert "eval/overdrawn" in after["metrics"] and "eval/overdrawn/single_object" in after["metrics"]
