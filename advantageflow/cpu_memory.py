"""Keep freed CPU memory in the process, so that large tensors stop page-faulting on every step.

Why: glibc's ``malloc`` serves every request above its mmap threshold (32 MiB at most on 64-bit
Linux) with a fresh ``mmap`` and unmaps it again on ``free``.  The held-out evaluation samples
the shipped DiT in batches of 256 (``sampler.batch_size``), which makes such tensors many times a
step (a GELU output of 256 x 76 x 512 floats is 40 MB), and each fresh mapping costs the kernel
one page fault per 4 KiB page to zero it: the memory-bound ops then run at the speed of the page
faults, not of the memory.  Measured on the 2-core AMD EPYC (2026-12-05, 2 threads,
``benchmarks/cpu_malloc.py``, ``benchmarks/results/cpu_malloc_2026-12-05.md``): ``x + 1`` over
10 M floats 9.8 -> 1.2 ms, tanh-GELU 17.6 -> 8.3 ms, the DiT's forward at batch 256 471 -> 409 ms,
one held-out evaluation 38.5 -> 29.2 s (another run: 37.7 -> 31.6 s).  Training's micro-batches
stay under the threshold, where glibc already reuses memory, so training epochs do not change.
PyTorch's CPU performance guide gives the same advice with jemalloc or tcmalloc preloaded; this
needs no extra library.

What :func:`reuse_freed_memory` does (glibc only, ``mallopt(3)``): ``M_MMAP_MAX = 0``, so large
blocks come from the heap, where freed ones are reused, and ``M_TRIM_THRESHOLD`` at 2 GiB, so
the heap's top is not handed back to the kernel after every step.  The heap still grows a few
times before it settles (a freed 64-byte aligned block can be a few bytes short of the next
aligned request once its small neighbours are taken): 0 to 6 of 40 fresh 40 MB results fault
in, against all 40 with glibc's defaults (``tests/test_cpu_memory.py``).  Numerics do not change:
torch asks for 64-byte aligned blocks either way, and the arithmetic is the same (the main job's
metrics are equal to the last bit with and without, ``tests/test_cpu_memory.py``).  The cost:
the process keeps its peak heap (its resident memory does not fall after a peak).  The
``advantageflow`` command calls it at start; ``ADVANTAGEFLOW_MALLOC=system`` keeps glibc's
defaults.  Importing the library changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest, ~2 GiB
OPT_OUT_ENV = "ADVANTAGEFLOW_MALLOC"


def reuse_freed_memory() -> str:
    """Set glibc's ``malloc`` to keep and reuse freed large blocks (module docstring).

    Returns what was done, for the record: ``"reuse"`` (applied), ``"system"`` (the user opted
    out with ``ADVANTAGEFLOW_MALLOC=system``) or ``"unchanged (...)"`` (not glibc, or ``mallopt``
    refused).
    """
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() == "system":
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unchanged (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return "reuse" if ok else "unchanged (mallopt refused)"
