"""CPU numerics that do not depend on the number of torch threads, and the record of what they
do depend on.

Why: torch's CPU kernels split their work over the intra-op threads.  Where a split cuts a
sum (the long inner dimension of the matrix product behind a weight gradient, a convolution's
weight gradient), the float additions happen in another order, so 1 and 2 threads give
gradients that differ in the last bits; a training run amplifies that over its epochs (the
same config and seed ended at different held-out scores on machines with different core
counts, issue 13).  Measured on the shipped DiT (``tests/test_reproducibility.py``): forward
passes were already equal, the weight gradients of its linear layers (MKL ``sgemm``) and of
its patch convolution (oneDNN) were not.

What this module does:

* MKL's conditional numerical reproducibility in *strict* mode (``MKL_CBWR=AUTO,STRICT``;
  Intel oneMKL developer reference, "Obtaining numerically reproducible results": strict CNR
  gives ``?gemm`` results that do not depend on the number of threads).  MKL reads the setting
  at its first call, so :mod:`advantageflow` sets the variable when it is imported
  (``advantageflow/__init__.py``); a value the user set is kept.  ``AUTO`` keeps MKL's own
  choice of code path for the CPU, so the results still depend on that path (``mkl_branch``).
* oneDNN off while training (:func:`thread_invariant_kernels`): a plain ``nn.Conv2d`` then
  runs as ATen's NNPACK / unfold + MKL ``sgemm``, whose gradients are thread-invariant under
  strict CNR.  The shipped DiT's convolutions (:class:`advantageflow.models.conv.InvariantConv2d`)
  turn oneDNN back on for their forward pass and input gradient only, which are
  thread-invariant, and compute the weight gradient as MKL GEMMs (ATen's kernel where MKL
  resolved no code path for the CPU): the same guarantee, faster.

What it cannot change: ATen's own parallel reductions give each thread a slice and add the
slices' partial sums, so a few kernels still depend on the thread count: a sum or mean of a
whole tensor of more than 32,768 elements to one value, the weight / bias gradients of an
affine ``LayerNorm``, and ``GroupNorm``'s input gradient at some sizes (6 channels per group at
16x16; measured with torch 2.13.0+cpu).  The shipped models avoid the first two (the DiT's and
the U-Net's thread tests check it bit for bit) and run every GroupNorm as
:class:`advantageflow.models.fixed_split.FixedSplitGroupNorm`, whose kernels run at a fixed thread
count (:func:`intra_op_threads`), so their split no longer follows the process's.  At odd counts
(3, 6) more kernels follow the split (elementwise SiLU / sigmoid / tanh-GELU, whose scalar tail
code rounds differently from the vector code, and oneDNN's convolution forward), so runs repeat
at 1, 2 and 4 threads, not reliably at 3 (measured 2026-12-05).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

STRICT_CBWR = "AUTO,STRICT"
_CBWR_ALL, _CBWR_STRICT = -1, 0x10000
# oneMKL's mkl_service.h: code-path (branch) constants of mkl_cbwr_get / mkl_cbwr_set.
_CBWR_BRANCHES = {
    0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
    8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
    14: "AVX512_E1",
}  # fmt: skip


def _mkl_library() -> ctypes.CDLL | None:
    """The library that holds MKL's service functions (linked into libtorch_cpu in pip wheels)."""
    candidates = [Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", None]
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path) if path else None)
        except OSError:
            continue
        if hasattr(lib, "mkl_serv_cbwr_get") or hasattr(lib, "mkl_cbwr_get"):
            return lib
    return None


def blas_mode() -> dict[str, Any]:
    """What MKL is doing about reproducibility: ``{"blas", "mkl_cbwr", "strict", "mkl_branch"}``.

    ``mkl_cbwr`` is the mode in MKL_CBWR's spelling (``AUTO,STRICT``), ``mkl_branch`` the code
    path it runs (``AVX512_E1``: the CPU's own unless a path is forced).

    ``strict`` is True when MKL's results do not depend on the thread count; None when it
    cannot be read (no MKL, or its service functions are not reachable).
    """
    if not torch.backends.mkl.is_available():
        return {"blas": "not MKL", "mkl_cbwr": None, "strict": None, "mkl_branch": None}
    lib = _mkl_library()
    if lib is None:
        return {"blas": "MKL", "mkl_cbwr": os.environ.get("MKL_CBWR"), "strict": None, "mkl_branch": None}
    get = getattr(lib, "mkl_serv_cbwr_get", None) or lib.mkl_cbwr_get
    mode = int(get(ctypes.c_int(_CBWR_ALL)))
    setting = _CBWR_BRANCHES.get(mode & 0xFFFF, str(mode & 0xFFFF))
    branch = setting
    auto = getattr(lib, "mkl_serv_cbwr_get_auto_branch", None)
    if setting in ("OFF", "BRANCH_OFF", "AUTO") and auto is not None:  # MKL dispatches by CPU
        branch = _CBWR_BRANCHES.get(int(auto()), "unknown")
    strict = bool(mode & _CBWR_STRICT)
    return {"blas": "MKL", "mkl_cbwr": setting + (",STRICT" if strict else ""), "strict": strict, "mkl_branch": branch}


@contextlib.contextmanager
def thread_invariant_kernels() -> Iterator[None]:
    """Within: oneDNN off (convolutions through ATen + MKL); a warning if MKL is not strict.

    Also usable as a decorator.  The previous oneDNN setting comes back on exit.
    """
    mode = blas_mode()
    if mode["strict"] is False:
        warnings.warn(
            "MKL is not in strict reproducible mode (MKL was used before advantageflow was imported, "
            f"or MKL_CBWR={os.environ.get('MKL_CBWR')!r}); results will depend on the torch thread count. "
            f"Set MKL_CBWR={STRICT_CBWR} before starting Python to avoid it.",
            RuntimeWarning, stacklevel=3,
        )
    with onednn(False):
        yield


# The thread count at which GroupNorm's kernels run, whatever the process's (models/fixed_split.py):
# the shipped U-Net was made at 2.
KERNEL_THREADS = 2


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` within; the previous count comes back on
    exit.  For kernels whose result depends on how the thread count splits their work
    (:class:`advantageflow.models.fixed_split.FixedSplitGroupNorm`): a fixed count fixes the split."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def at_most_threads(count: int) -> contextlib.AbstractContextManager[None]:
    """torch's intra-op thread count lowered to ``count`` within if it is higher; never raised.
    For kernels whose bits agree at 1 and ``count`` threads but not above: capping fixes the split
    above ``count`` without the cost of raising a 1-thread process to more threads, which on a
    shared 2-core machine let two 1-thread runs oversubscribe the cores (measured 2026-12-05 on
    the AMD EPYC: two 1-thread DiT training steps side by side took 1.0-3.4 s with the count raised
    in its 3 convolution weight gradients, 0.55-0.85 s without)."""
    return intra_op_threads(min(count, torch.get_num_threads()))


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off within; the previous setting comes back on exit."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics_record() -> dict[str, Any]:
    """Everything a run's numbers depend on besides its config and seed (JSON-able).

    ``threads`` is informative at 1, 2 or 4: with the kernels above those counts give the
    shipped models the same numbers (odd counts are not covered: module docstring).
    """
    import numpy

    mode = blas_mode()
    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        **mode,
        "onednn_enabled": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def numerics_header(record: dict[str, Any] | None = None) -> str:
    """The record as YAML comment lines (the head of a run's ``config.yaml``)."""
    rec = record or numerics_record()
    return (
        f"# numerics: torch {rec['torch']} ({str(rec['torch_git'])[:10]}), cpu capability {rec['cpu_capability']}, "
        f"BLAS {rec['blas']} {rec['mkl_cbwr'] or ''} {rec['mkl_branch'] or ''}, "
        f"oneDNN {'on' if rec['onednn_enabled'] else 'off'}, "
        f"torch threads {rec['threads']}, {rec['cpu']}, python {rec['python']}, numpy {rec['numpy']}\n"
    ).replace("  ", " ")

