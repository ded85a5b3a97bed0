"""``scripts/gpu_check.sh``: without CUDA it says so and exits 0; its matrix, table and exit
code are exercised on the CPU (float32) with the tiny SD3 pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from advantageflow.gpu_check import main
from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_0():
    out = subprocess.run([sys.executable, "-m", "advantageflow.gpu_check"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "no CUDA device" in out.stdout


def test_cpu_matrix_prints_a_row_per_cell(tmp_path, capsys):
    table = tmp_path / "table.md"
    code = main(["--device", "cpu", "--models", "sd3", "--algos", "advantageflow,draft", "--epochs", "1",
                 "--out", str(table)])
    assert code == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| sd3 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["advantageflow", "draft"]
    assert all(r.rstrip(" |").endswith("ok") for r in rows)


def test_a_failing_cell_is_reported_and_fails_the_check(tmp_path, capsys):
    assert main(["--device", "cpu", "--models", "nosuchmodel", "--algos", "advantageflow", "--epochs", "1"]) == 1
    assert "| nosuchmodel | advantageflow |" in capsys.readouterr().out
