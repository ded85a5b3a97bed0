"""Checkpoints appear atomically, old ones are pruned, bad ones fail clearly."""

from __future__ import annotations

import pytest
import torch

from advantageflow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _save(root, epoch, value=1.0, keep=2):
    return save_checkpoint(root, epoch, {"w": torch.full((3,), value)}, {"opt": 1}, {"alg": torch.ones(2)},
                           {"loop": {"epoch": epoch}}, keep=keep)


def test_round_trip_and_pruning(tmp_path):
    for e in (1, 2, 3):
        _save(tmp_path, e, value=float(e))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(ck.policy["w"], torch.full((3,), 3.0))
    assert ck.trainer == {"loop": {"epoch": 3}} and ck.optimizer == {"opt": 1}


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 1)
    partial = tmp_path / "ckpt-000002.tmp-999"
    partial.mkdir()
    (partial / "policy.safetensors").write_bytes(b"half")
    incomplete = tmp_path / "ckpt-000003"  # a folder without trainer.json is not complete
    incomplete.mkdir()
    assert latest_checkpoint(tmp_path).name == "ckpt-000001"
    _save(tmp_path, 4, keep=5)
    assert not partial.exists()


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    path = _save(tmp_path, 1)
    (path / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing optimizer.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_non_finite_parameters_are_never_saved(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="non-finite"):
        _save(tmp_path, 2, value=float("nan"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001"]
