"""Atomic checkpoints: a complete folder appears by one rename, or not at all.

Layout of ``RUN/checkpoints/ckpt-EEEEEE/`` (``E`` = epochs completed)::

    policy.safetensors   trainable parameters (LoRA weights or the whole model)
    optimizer.pt         optimizer state
    algorithm.pt         the algorithm's state (old / EMA snapshots)
    trainer.json         epoch, step, counters, history, the config trained with
    manifest.json        SHA-256 digest and size of each file above; written last

plus what the policy adds for other tools (``extras``), covered by the manifest too: for a LoRA
diffusers policy ``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(folder)``
attaches (:mod:`advantageflow.models.lora_io`).

A checkpoint is written into ``ckpt-EEEEEE.tmp-PID``, flushed to disk, then renamed; a run
killed mid-write leaves only a ``.tmp`` folder, which :func:`latest_checkpoint` ignores and
the next save removes.

A checkpoint is *intact* when every file matches its digest in the manifest; nothing is
loaded before that check (:func:`verify_checkpoint`).  :func:`latest_checkpoint` returns the
newest intact checkpoint (warning in one line about each newer damaged one), and pruning keeps
the ``keep`` newest intact checkpoints: a damaged newer folder never causes an intact older
one to be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from advantageflow.faults import fault_point

CKPT_RE = re.compile(r"^ckpt-(\d{6})$")
MANIFEST = "manifest.json"
FILES = ("policy.safetensors", "optimizer.pt", "algorithm.pt", "trainer.json")


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


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Digest every file written (the required ones and any extras)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    files = {name: {"sha256": file_digest(folder / name), "bytes": (folder / name).stat().st_size}
             for name in names}
    with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1)


def save_checkpoint(
    root: Path,
    epoch: int,
    policy_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    algorithm_state: dict,
    trainer_state: dict,
    keep: int = 2,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically (with its manifest) and prune old ones; returns its folder.

    ``extras(folder)`` may add files (e.g. a diffusers-format adapter) before the manifest."""
    if int(keep) < 1:
        raise CheckpointError(f"checkpoint.keep must be >= 1, got {keep}")
    for name, tensor in policy_state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save a non-finite parameter '{name}'")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{epoch:06d}"
    tmp = root / f"ckpt-{epoch:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in policy_state.items()}, str(tmp / "policy.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(algorithm_state, tmp / "algorithm.pt")
        with open(tmp / "trainer.json", "w", encoding="utf-8") as fh:
            json.dump(trainer_state, fh)
        if extras is not None:
            extras(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _write_manifest(tmp)  # digests of what is on disk, after the flush
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
    except Exception as err:  # noqa: BLE001 - a full disk surfaces as OSError or torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        first = (" ".join(str(err).split()) or type(err).__name__)[:300]
        raise CheckpointError(f"cannot write checkpoint '{final}' (the previous one is intact): {first}") from None
    fault_point("checkpoint")
    if final.exists():  # re-saving the same epoch (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest intact checkpoints and anything newer than the oldest of
    them (damaged newer folders are left for inspection); delete older ones."""
    complete = list_checkpoints(root)
    intact = 0
    cut = None
    for i in range(len(complete) - 1, -1, -1):
        if checkpoint_problem(complete[i]) is None:
            intact += 1
            if intact == keep:
                cut = i
                break
    if cut is not None:
        for old in complete[:cut]:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("ckpt-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoint folders (intact or not), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    found = [p for p in found if (p / "trainer.json").exists() or (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not an intact checkpoint (one line), or ``None`` when every file
    matches the SHA-256 digest and size recorded in its manifest."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        return f"is incomplete: missing {', '.join(missing)}"
    try:
        with open(path / MANIFEST, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        for name in dict.fromkeys([*FILES, *files]):  # the required files, then any extras
            if not (path / name).is_file():
                return f"is incomplete: missing {name}"
            entry = files[name]
            size = (path / name).stat().st_size
            if size != int(entry["bytes"]):
                return f"is damaged: {name} has {size} bytes, the manifest says {entry['bytes']}"
            if file_digest(path / name) != entry["sha256"]:
                return f"is damaged: {name} does not match its SHA-256 digest"
    except FileNotFoundError:
        return f"has no {MANIFEST} (cannot be verified)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has an unreadable {MANIFEST} ({type(err).__name__})"
    return None


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is intact."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint '{path}' {problem}")


def latest_checkpoint(root: Path, warn: bool = True) -> Path | None:
    """The newest *intact* checkpoint under ``root`` (``None`` when there is no checkpoint).

    Each newer damaged one is reported in one line on stderr and skipped; if checkpoints
    exist but none is intact, :class:`CheckpointError` says so (never a silent fresh start).
    """
    found = list_checkpoints(root)
    first_problem = None
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        first_problem = first_problem or f"'{path}' {problem}"
        if warn:
            print(f"[advantageflow] warning: skipping checkpoint '{path}': it {problem}", file=sys.stderr)
    if found:
        raise CheckpointError(f"no intact checkpoint under '{root}' (newest: {first_problem}); "
                              "restore one or start a new --run-dir")
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify a checkpoint folder against its manifest, then load it; one clear error if not."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    verify_checkpoint(path)
    try:
        policy = load_file(str(path / "policy.safetensors"), device=str(map_location))
        optimizer = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        algorithm = torch.load(path / "algorithm.pt", map_location=map_location, weights_only=True)
        with open(path / "trainer.json", encoding="utf-8") as fh:
            trainer: dict[str, Any] = json.load(fh)
        if not isinstance(trainer, dict):
            raise ValueError("trainer.json must hold an object")
    except Exception as err:  # noqa: BLE001 - any decoding failure means corrupt
        first = (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {type(err).__name__}: {first}") from None
    return Checkpoint(path=path, policy=policy, optimizer=optimizer, algorithm=algorithm, trainer=trainer)
