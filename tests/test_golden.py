"""Golden numbers: short seeded runs must reproduce stored per-epoch metrics.

Every other test checks relations (the reward rises, resuming equals not stopping, 1 and 2
threads agree), so a silent change in a loss formula or in which random numbers a run draws
passes them.  Here each of the seven 2-D configs (``configs/toy2d_<algo>.yaml``) trains two
epochs and the main job (``configs/shapes_advantageflow.yaml``, shrunk) one epoch, and the
per-epoch ``loss/total`` and ``reward/mean`` (and the main job's ``eval/reward_mean``) from
``metrics.jsonl`` must match ``tests/golden/toy2d.json`` and ``tests/golden/shapes.json``.

After a deliberate change of the numbers, regenerate the stored values (and review the diff):

    AF_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py

(``-k awm`` and the like regenerate only the chosen cases.)  The values belong to the torch
build and CPU code path recorded under ``_numerics`` in each file (``advantageflow.numerics``);
a failure message names both records when they differ.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from advantageflow.config import load_config
from advantageflow.numerics import numerics_header, numerics_record
from advantageflow.runlog import read_metrics
from advantageflow.trainer import train
from tests.conftest import REPO

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN_ENV = "AF_REGEN_GOLDEN"
REGEN_COMMAND = f"{REGEN_ENV}=1 python -m pytest tests/test_golden.py"
# Why these tolerances: on one machine the runs are bit-exact whatever the thread count (MKL
# strict CNR, oneDNN off; tests/test_reproducibility.py), so any slack only absorbs the
# float32 summation-order differences of another CPU code path or a torch build with the same
# maths (measured: see the PR notes in docs).  A relative 1e-5 is ~100 float32 ulps; the
# smallest real change we tried (another seed, a constant off by 1 %) moves every value by
# 1e-3 or more.  The absolute floor covers losses that are near-cancellations of O(1) terms
# (AWM's on-policy loss at epoch 1 is ~2e-9): there the rounding of the terms, ~1e-8, is all
# there is.
REL_TOL = 1e-5
ABS_TOL = 1e-8
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


TOY_SHORT = ("train.epochs=2", "eval.every=0", "checkpoint.every=100")
CASES = {
    f"toy2d_{algo}": Case(f"configs/toy2d_{algo}.yaml", "toy2d.json", TOY_SHORT) for algo in TOY_ALGOS
}
# The main job's first epoch on two prompts, with evaluation (before and after) on six.
CASES["shapes_advantageflow"] = Case(
    "configs/shapes_advantageflow.yaml", "shapes.json",
    ("train.epochs=1", "train.prompts_per_epoch=2", "eval.num_prompts=6", "eval.samples_per_prompt=1",
     "log.tensorboard=false", "log.progress=false"),
    keys=(*TRAIN_KEYS, "eval/reward_mean"), toy=False,
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


def mismatches(expected: dict, got: dict) -> list[str]:
    """One line per (epoch, key) that is missing on either side or differs beyond the tolerance."""
    lines = []
    for epoch in sorted(set(expected) | set(got), key=int):
        want, have = expected.get(epoch, {}), got.get(epoch, {})
        for key in sorted(set(want) | set(have)):
            a, b = want.get(key), have.get(key)
            if a is None or b is None or not math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL):
                rel = abs(b - a) / max(abs(a), 1e-300) if a is not None and b is not None else float("nan")
                lines.append(f"  epoch {epoch} {key}: expected {a!r}, got {b!r} (relative diff {rel:.2e})")
    return lines


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _regenerate(path: Path, name: str, values: dict) -> None:
    """Store ``values`` under ``name`` (other cases kept) with this machine's numerics record."""
    data = _load(path)
    data["_numerics"] = numerics_record()
    data["_regenerate"] = REGEN_COMMAND
    data[name] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


@pytest.mark.parametrize("name", list(CASES))
def test_short_run_reproduces_golden_metrics(name, tmp_path, toy_overrides):
    case = CASES[name]
    path = GOLDEN / case.golden_file
    got = run_values(case, tmp_path / "run", toy_overrides)
    assert got, f"{name}: no pinned metrics in metrics.jsonl"
    if os.environ.get(REGEN_ENV) == "1":
        _regenerate(path, name, got)
        pytest.skip(f"{REGEN_ENV}=1: wrote {name} to {path.relative_to(REPO)}")
    data = _load(path)
    assert name in data, f"no golden values for {name} in {path}; create them with: {REGEN_COMMAND}"
    diff = mismatches(data[name], got)
    if diff:
        stored, here = data.get("_numerics"), numerics_record()
        platform = "" if stored is None else (
            f"\nstored with: {numerics_header(stored).strip()}\nthis run:    {numerics_header(here).strip()}"
        )
        pytest.fail(
            f"{name} no longer reproduces {path.relative_to(REPO)} (rel_tol {REL_TOL}, abs_tol {ABS_TOL}):\n"
            + "\n".join(diff) + platform
            + f"\nIf the change is intended, regenerate with: {REGEN_COMMAND} -k {name}",
            pytrace=False,
        )
