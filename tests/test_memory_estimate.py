"""``advantageflow estimate-memory``: the weightless estimate of a training step's peak memory
against the same step run for real on the CPU (tiny pipelines), the shipped architectures, and
the command's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from advantageflow.cli import main
from advantageflow.config import load_config
from advantageflow.memory_estimate import (
    GIB,
    SHIPPED_ARCHS,
    LiveBytes,
    estimate_memory,
    measure_cpu_step,
    meta_transformer,
    shipped_arch,
)
from tests.conftest import REPO

pytest.importorskip("diffusers")
pytest.importorskip("peft")

#: the largest relative error of the estimated peak against the measured one that we accept
#: (measured: at most 0.32 % on these cases -- the RNG states checkpointing saves -- see docs/models.md).
TOLERANCE = 0.02


# As the GPU configs: LoRA, gradient checkpointing, two micro-batches per step.
GPU_LIKE = ["model.gradient_checkpointing=true", "train.micro_batch_size=4"]


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("sd3_tiny_advantageflow.yaml", GPU_LIKE),
        ("flux_tiny_advantageflow.yaml", GPU_LIKE),
        # full fine-tuning (float32 copy + frozen copy), Flow-GRPO's trajectories and CFG batch
        (
            "sd3_tiny_flow_grpo.yaml",
            ["model.lora.enabled=false", "sampler.guidance_scale=2.0", "model.cfg=true", "sampler.steps=3"],
        ),
    ],
)
def test_estimate_matches_a_real_cpu_run(config, overrides):
    cfg = load_config(str(REPO / "configs" / config), overrides)
    estimate = estimate_memory(cfg)
    measured = measure_cpu_step(cfg)
    error = estimate.peak_gib * GIB / measured - 1
    assert abs(error) < TOLERANCE, (estimate.peak_gib * GIB, measured)
    parts = (
        estimate.weights_gib
        + estimate.trainable_gib
        + estimate.gradients_gib
        + estimate.optimizer_gib
        + estimate.snapshots_gib
        + estimate.rollout_gib
        + estimate.activations_gib
    )
    assert parts == pytest.approx(estimate.peak_gib)
    assert min(estimate.optimizer_gib, estimate.activations_gib, estimate.rollout_gib) > 0
    assert estimate.optimizer_gib == pytest.approx(2 * estimate.trainable_gib, rel=0.01)  # + AdamW step counters


# Parameter counts of the published transformers (the json files must reproduce them).
PUBLISHED_PARAMS = {"sd3.5-medium": 2.24e9, "flux.1-dev": 11.90e9, "qwen-image": 20.43e9}


@pytest.mark.parametrize("name", SHIPPED_ARCHS)
def test_shipped_architectures_build_the_published_transformers(name):
    arch = shipped_arch(name)
    model = meta_transformer(arch.transformer, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "meta"


def test_live_bytes_counts_storages_once_and_forgets_freed_ones():
    meter = LiveBytes()
    with meter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]
        b = a + 1  # another 4000
        del b
        c = torch.zeros(250)  # 1000
    assert meter.peak == 8000 and meter.current == 5000
    del view, c


def test_cli_prints_the_estimate(capsys):
    config = str(REPO / "configs" / "flux_tiny_advantageflow.yaml")
    assert main(["estimate-memory", config, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "flux" and report["device"] == "cpu" and report["peak_gib"] > 0
    assert report["total_gib"] == pytest.approx(report["peak_gib"] + report["resident_gib"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/toy2d_advantageflow.yaml"], "covers the diffusers models"),
        (["configs/sd3_tiny_advantageflow.yaml", "--arch", "nope"], "no shipped architecture 'nope'"),
        (["configs/sd3_tiny_advantageflow.yaml", "--arch", "flux.1-dev"], "is a flux model"),
        (["configs/sd3_tiny_advantageflow.yaml", "model.path=someone/not-cached"], "give --arch"),
    ],
)
def test_cli_errors_are_one_line(args, message, capsys):
    args = [str(REPO / args[0]), *args[1:]]
    assert main(["estimate-memory", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
