"""Golden numbers: short seeded runs must reproduce stored per-epoch metrics.

Every other test checks relations (the reward rises, resuming equals not stopping, 1 and 2
threads agree), so a silent change in a loss formula or in which random numbers a run draws
passes them.  Here each of the seven 2-D configs (``configs/toy2d_<algo>.yaml``) trains two
epochs and the main job (``configs/shapes_advantageflow.yaml``, shrunk) one epoch, and the
per-epoch ``loss/total`` and ``reward/mean`` (and the main job's ``eval/reward_mean``) from
``metrics.jsonl`` must match ``tests/golden/toy2d.json`` and ``tests/golden/shapes.json``.

After a deliberate change of the numbers, regenerate the stored values (and review the diff):

    AF_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py

(``-k awm`` and the like regenerate only the chosen cases.)  Each case stores the platform it
was made on (torch build, CPU code path, numpy, Python: ``PLATFORM_KEYS``); on that platform
the comparison is effectively exact, on another one it allows float summation-order
differences (tolerances below), and a failure message names what differs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from advantageflow.config import load_config
from advantageflow.numerics import numerics_record
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN_ENV = "AF_REGEN_GOLDEN"
REGEN_COMMAND = f"{REGEN_ENV}=1 python -m pytest tests/test_golden.py"
# Tolerances (math.isclose).  On the platform the values were stored on (same torch build,
# CPU code path, numpy and Python: PLATFORM_KEYS) a run is bit-exact whatever the thread count
# (MKL strict CNR, oneDNN off; tests/test_reproducibility.py), so SAME_PLATFORM is equality in
# all but name: a one-ulp float32 change of one sample's loss moves loss/total by ~1e-10.
# Measured 2026-12-02 against the stored values: 1 vs 2 torch threads, difference 0; AWM's
# HUBER_DELTA 1e-10 -> 1e-9 (a near no-op of the maths) 1.0e-6, fails; advantage.eps +10 %:
# 2e-6 to 7e-5 in the five algorithms that use it, fail; another seed, rows of RowRandom
# permuted, shapes lambda_ref +10 %: 1e-4 to 1, fail.  Another CPU code path adds
# float32 summation-order noise that two epochs amplify: ATEN_CPU_CAPABILITY=avx2
# MKL_CBWR=AVX2,STRICT gave up to 3.1e-5 (toy2d_advantageflow loss/total; the main job 7.6e-6;
# rewards equal).  OTHER_PLATFORM allows 3x that, so it still catches a changed draw but not
# every small formula change; its absolute floor is for losses that are near-cancellations of
# O(1) terms (AWM's on-policy loss at epoch 1, ~2e-9, is a rounding residue of -mean(A)).
SAME_PLATFORM = {"rel_tol": 1e-12, "abs_tol": 0.0}
OTHER_PLATFORM = {"rel_tol": 1e-4, "abs_tol": 1e-8}
# What the numbers depend on besides config and seed (advantageflow.numerics.numerics_record);
# the Python version because the trainer averages metrics with sum() (compensated from 3.12).
PLATFORM_KEYS = ("torch", "torch_git", "cpu_capability", "mkl_cbwr", "mkl_branch", "numpy", "python", "cuda")
# Train-time metrics pinned per epoch (the reward pins the rollouts' noise and the sampler).
TRAIN_KEYS = ("loss/total", "reward/mean")
TOY_ALGOS = ("advantageflow", "awm", "diffusion_nft", "epg", "ram", "flow_grpo", "draft")


@dataclass(frozen=True)
class Case:
    """One golden run: a shipped config, the overrides that make it short, what is pinned."""

    config: str
    golden_file: str
    overrides: tuple[str, ...]
    keys: tuple[str, ...] = TRAIN_KEYS
    toy: bool = True  # uses the session's cached 2-D base model (``toy_overrides``)


# pretrain_steps as toy_overrides sets it, pinned here: the golden values depend on it.
TOY_SHORT = ("model.pretrain_steps=1500", "train.epochs=2", "eval.every=0", "checkpoint.every=100")
CASES = {f"toy2d_{algo}": Case(f"configs/toy2d_{algo}.yaml", "toy2d.json", TOY_SHORT) for algo in TOY_ALGOS}
# The main job's first epoch on two prompts, with evaluation (before and after) on six.
CASES["shapes_advantageflow"] = Case(
    "configs/shapes_advantageflow.yaml",
    "shapes.json",
    (
        "train.epochs=1",
        "train.prompts_per_epoch=2",
        "eval.num_prompts=6",
        "eval.samples_per_prompt=1",
        "log.tensorboard=false",
        "log.progress=false",
    ),
    keys=(*TRAIN_KEYS, "eval/reward_mean"),
    toy=False,
)


def run_values(case: Case, run_dir: Path, toy_overrides: list[str]) -> dict[str, dict[str, float]]:
    """Train ``case`` into ``run_dir``; its pinned metrics as ``{epoch: {key: value}}``."""
    overrides = [*(toy_overrides if case.toy else []), *case.overrides]
    train(load_config(str(REPO / case.config), overrides), run_dir)
    values: dict[str, dict[str, float]] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        picked = {k: row[k] for k in case.keys if k in row}
        if picked:
            values.setdefault(str(row["epoch"]), {}).update(picked)
    return values


def platform(record: dict) -> dict:
    """The part of a numerics record the numbers depend on (Python as major.minor)."""
    picked = {k: record.get(k) for k in PLATFORM_KEYS}
    picked["python"] = ".".join(str(picked["python"]).split(".")[:2])
    return picked


def mismatches(expected: dict, got: dict, tol: dict[str, float]) -> list[str]:
    """One line per (epoch, key) missing on either side or differing beyond ``tol``
    (``math.isclose`` keyword arguments); ``expected`` and ``got`` are ``{epoch: {key: value}}``."""
    lines = []
    for epoch in sorted(set(expected) | set(got), key=int):
        want, have = expected.get(epoch, {}), got.get(epoch, {})
        for key in sorted(set(want) | set(have)):
            a, b = want.get(key), have.get(key)
            if a is None or b is None or not math.isclose(a, b, **tol):
                rel = abs(b - a) / max(abs(a), 1e-300) if a is not None and b is not None else float("nan")
                lines.append(f"  epoch {epoch} {key}: expected {a!r}, got {b!r} (relative diff {rel:.2e})")
    return lines


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _regenerate(path: Path, name: str, values: dict) -> None:
    """Store ``values`` under ``name`` (other cases kept) with this machine's platform."""
    data = _load(path)
    data["_regenerate"] = REGEN_COMMAND
    data[name] = {"platform": platform(numerics_record()), "epochs": values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


def _platform_note(stored: dict, here: dict) -> str:
    """Which platform the comparison ran on, and how it differs from the stored values'."""
    differ = [f"{k} {stored.get(k)!r} -> {here[k]!r}" for k in here if stored.get(k) != here[k]]
    return "the stored values' platform" if not differ else "another platform: " + ", ".join(differ)


@pytest.mark.parametrize("name", list(CASES))
def test_short_run_reproduces_golden_metrics(name, tmp_path, toy_overrides):
    case = CASES[name]
    path = GOLDEN / case.golden_file
    got = run_values(case, tmp_path / "run", toy_overrides)
    assert got, f"{name}: no pinned metrics in metrics.jsonl"
    if os.environ.get(REGEN_ENV) == "1":
        _regenerate(path, name, got)
        pytest.skip(f"{REGEN_ENV}=1: wrote {name} to {path.relative_to(REPO)}")
    stored = _load(path).get(name)
    assert stored, f"no golden values for {name} in {path}; create them with: {REGEN_COMMAND} -k {name}"
    here = platform(numerics_record())
    tol = SAME_PLATFORM if stored["platform"] == here else OTHER_PLATFORM
    diff = mismatches(stored["epochs"], got, tol)
    if diff:
        pytest.fail(
            f"{name} no longer reproduces {path.relative_to(REPO)} (rel_tol {tol['rel_tol']}, abs_tol "
            f"{tol['abs_tol']}; {_platform_note(stored['platform'], here)}):\n"
            + "\n".join(diff)
            + f"\nIf the change is intended, regenerate with: {REGEN_COMMAND} -k {name}",
            pytrace=False,
        )
