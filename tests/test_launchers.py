"""The launchers a GPU user reaches for, exercised on the CPU with gloo: ``accelerate launch``
(two processes) and a two-node ``torchrun`` job (two agents on one machine, rendezvous on
127.0.0.1).  Each must log the same metrics as one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from advantageflow.checkpoint import latest_checkpoint, load_checkpoint
from advantageflow.config import load_config
from advantageflow.trainer import train
from tests.conftest import REPO
from tests.test_distributed import TOY, _assert_same, _rows, warm_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.two_cores  # 2 processes: one xdist worker runs these (tests/conftest.py)

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(toy_overrides) -> list[str]:
    return [*toy_overrides, "eval.every=0", "checkpoint.every=2", "train.epochs=3"]


def _world_size(run_dir: Path) -> int:
    """The world size the run's last checkpoint was written by."""
    return load_checkpoint(latest_checkpoint(run_dir / "checkpoints")).trainer["world_size"]


def _single(tmp_path, args) -> list[dict]:
    train(load_config(TOY, args), tmp_path / "one")
    return _rows(tmp_path / "one")


def test_accelerate_launch_two_processes_match_one(tmp_path, toy_overrides, warm_cache):  # noqa: F811
    accelerate = shutil.which("accelerate", path=str(BIN))
    if accelerate is None:
        pytest.skip("accelerate is not installed (peft, in the diffusers extra, brings it)")
    args = _args(toy_overrides)
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "advantageflow", "train", TOY, *args, "--run-dir", str(tmp_path / "acc")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _world_size(tmp_path / "acc") == 2
    _assert_same(_single(tmp_path, args), _rows(tmp_path / "acc"))


def test_two_torchrun_nodes_on_one_machine_match_one_process(tmp_path, toy_overrides, warm_cache):  # noqa: F811
    """``--nnodes 2``: two agents, one process each, c10d rendezvous on 127.0.0.1 — the
    multi-node path (node ranks, rendezvous, cross-node all-reduce) without a second host."""
    args = _args(toy_overrides)
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [
        subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "af-two-nodes",
             "-m", "advantageflow", "train", TOY, *args, "--run-dir", str(tmp_path / "nodes")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        for rank in (0, 1)
    ]
    results = [a.communicate(timeout=300) for a in agents]
    for agent, (_, err) in zip(agents, results):
        assert agent.returncode == 0, err[-3000:]
    assert _world_size(tmp_path / "nodes") == 2
    _assert_same(_single(tmp_path, args), _rows(tmp_path / "nodes"))
