"""Checkpoints appear atomically, old ones are pruned, bad ones fail clearly, and a damaged
one is never loaded (SHA-256 manifest) nor a reason to delete an intact one."""

from __future__ import annotations

import json

import pytest
import torch

from advantageflow.checkpoint import (
    CheckpointError,
    _prune,
    checkpoint_problem,
    file_digest,
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
    with pytest.raises(CheckpointError, match="is damaged: policy.safetensors has 22 bytes"):
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


def _flip(path, offset_from_end=40, n=16):
    """Flip ``n`` bytes near the end of a file (past a safetensors header: data, not structure)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) - offset_from_end)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_sha256_of_every_file(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"policy.safetensors", "optimizer.pt", "algorithm.pt", "trainer.json"}
    import hashlib

    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest() == file_digest(path / name)
        assert entry["bytes"] == (path / name).stat().st_size
    assert checkpoint_problem(path) is None


def test_extra_files_are_written_before_the_manifest_and_verified(tmp_path):
    def adapter(folder):
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"adapter bytes")

    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {}, {}, {"loop": {}}, extras=adapter)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"]["pytorch_lora_weights.safetensors"]["bytes"] == len(b"adapter bytes")
    assert checkpoint_problem(path) is None
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"adapter bytez")
    assert checkpoint_problem(path) == "is damaged: pytorch_lora_weights.safetensors does not match its SHA-256 digest"
    (path / "pytorch_lora_weights.safetensors").unlink()
    assert checkpoint_problem(path) == "is incomplete: missing pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("damage,reason", [
    (lambda p: _flip(p / "policy.safetensors", offset_from_end=8, n=8), "policy.safetensors does not match"),
    (lambda p: _flip(p / "optimizer.pt", offset_from_end=200), "optimizer.pt does not match"),
    (lambda p: _flip(p / "algorithm.pt", offset_from_end=200), "algorithm.pt does not match"),
    # the edit (epoch 4 -> 2 there; 2 -> 1 here), same length so only the digest can tell
    (lambda p: (p / "trainer.json").write_text((p / "trainer.json").read_text().replace("2", "1")),
     "trainer.json does not match"),
    (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
    (lambda p: (p / "manifest.json").write_text("{"), "unreadable manifest.json"),
    (lambda p: (p / "optimizer.pt").unlink(), "incomplete: missing optimizer.pt"),
])
def test_damaged_checkpoint_is_skipped_with_one_line_warning(tmp_path, capsys, damage, reason):
    for e in (1, 2):
        _save(tmp_path, e, value=float(e), keep=3)
    damage(tmp_path / "ckpt-000002")
    assert reason in checkpoint_problem(tmp_path / "ckpt-000002")
    with pytest.raises(CheckpointError, match="ckpt-000002"):
        load_checkpoint(tmp_path / "ckpt-000002")
    assert latest_checkpoint(tmp_path).name == "ckpt-000001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipping checkpoint" in err[0] and reason in err[0]
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path)).policy["w"], torch.full((3,), 1.0))


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = _save(tmp_path, 1)
    _flip(path / "policy.safetensors", offset_from_end=8, n=8)
    with pytest.raises(CheckpointError, match="no intact checkpoint under .*policy.safetensors does not match"):
        latest_checkpoint(tmp_path, warn=False)
    assert latest_checkpoint(tmp_path / "empty") is None


def test_pruning_keeps_the_newest_intact_checkpoints(tmp_path):
    for e in (1, 2, 3):
        _save(tmp_path, e, keep=5)
    _flip(tmp_path / "ckpt-000003" / "policy.safetensors", offset_from_end=8, n=8)
    _prune(tmp_path, keep=1)  # the newest is damaged: the newest intact one (2) must stay
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    _save(tmp_path, 4, keep=2)  # keeps 4 and 2 (intact), and the damaged 3 between them
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003", "ckpt-000004"]
    _save(tmp_path, 5, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000004", "ckpt-000005"]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, keep):
    _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="checkpoint.keep must be >= 1"):
        _save(tmp_path, 2, keep=keep)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001"]


def test_a_write_failure_leaves_the_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*ckpt-000002.*previous one is intact"):
        _save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001"]
    assert latest_checkpoint(tmp_path).name == "ckpt-000001"
