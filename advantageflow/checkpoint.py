"""Atomic checkpoints: a complete folder appears by one rename, or not at all.

Layout of ``RUN/checkpoints/ckpt-EEEEEE/`` (``E`` = epochs completed)::

    policy.safetensors   trainable parameters (LoRA weights or the whole model)
    optimizer.pt         optimizer state
    algorithm.pt         the algorithm's state (old / EMA snapshots)
    trainer.json         epoch, step, counters, history; written last

A checkpoint is written into ``ckpt-EEEEEE.tmp-PID``, flushed to disk, then renamed; a run
killed mid-write leaves only a ``.tmp`` folder, which :func:`latest_checkpoint` ignores and
the next save removes.  The last ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from advantageflow.faults import fault_point

CKPT_RE = re.compile(r"^ckpt-(\d{6})$")


class CheckpointError(RuntimeError):
    """A missing, partial or corrupt checkpoint."""


@dataclass
class Checkpoint:
    """What a checkpoint holds once loaded."""

    path: Path
    policy: dict[str, torch.Tensor]
    optimizer: dict
    algorithm: dict
    trainer: dict


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(
    root: Path,
    epoch: int,
    policy_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    algorithm_state: dict,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its folder."""
    for name, tensor in policy_state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save a non-finite parameter '{name}'")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{epoch:06d}"
    tmp = root / f"ckpt-{epoch:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in policy_state.items()}, str(tmp / "policy.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(algorithm_state, tmp / "algorithm.pt")
    with open(tmp / "trainer.json", "w", encoding="utf-8") as fh:
        json.dump(trainer_state, fh)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    fault_point("checkpoint")
    if final.exists():  # re-saving the same epoch (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = list_checkpoints(root)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("ckpt-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    found = [p for p in found if (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder, with a clear error naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    needed = ["policy.safetensors", "optimizer.pt", "algorithm.pt", "trainer.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    try:
        policy = load_file(str(path / "policy.safetensors"), device=str(map_location))
        optimizer = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        algorithm = torch.load(path / "algorithm.pt", map_location=map_location, weights_only=True)
        with open(path / "trainer.json", encoding="utf-8") as fh:
            trainer: dict[str, Any] = json.load(fh)
    except Exception as err:  # noqa: BLE001 - any decoding failure means corrupt
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {type(err).__name__}: {err}") from None
    return Checkpoint(path=path, policy=policy, optimizer=optimizer, algorithm=algorithm, trainer=trainer)
