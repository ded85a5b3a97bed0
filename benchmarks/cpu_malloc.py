"""What glibc's fresh mappings cost the CPU runs, and what ``advantageflow.cpu_memory`` saves.

Each case runs in its own process twice, once with glibc's defaults (``ADVANTAGEFLOW_MALLOC=system``)
and once with :func:`advantageflow.cpu_memory.reuse_freed_memory`, side by side per case, and prints
a markdown table (milliseconds or seconds, the ratio, and whether the results are equal):

* ``x + 1`` on 10 M floats into a fresh tensor (the memory-bound op at its simplest);
* tanh-GELU on 256 x 76 x 512 floats (the DiT's MLP activation at the sampling batch);
* the shipped DiT's forward at batch 256 (no grad, the trainer's kernels);
* one held-out ShapesEval evaluation of the shipped base (``evaluate_policy``, 864 images x 20 steps).

    python benchmarks/cpu_malloc.py [--threads 2] [--out benchmarks/results/cpu_malloc.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASE = r"""
import json, os, sys, time
import torch
import advantageflow  # noqa: F401  (MKL's strict mode before the first product)
from advantageflow.cpu_memory import reuse_freed_memory
mode = reuse_freed_memory()
torch.set_num_threads(int(sys.argv[2]))
case = sys.argv[1]

def best(fn, n):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t)
    return min(times), out

if case == "add":
    x = torch.randn(10_000_000, generator=torch.Generator().manual_seed(0))
    sec, out = best(lambda: x + 1, 20)
    check = float(out.double().sum())
elif case == "gelu":
    x = torch.randn(256 * 76, 512, generator=torch.Generator().manual_seed(0))
    sec, out = best(lambda: torch.nn.functional.gelu(x, approximate="tanh"), 20)
    check = float(out.double().sum())
elif case == "forward":
    from advantageflow.models.dit import load_asset
    from advantageflow.numerics import thread_invariant_kernels
    net, _ = load_asset("")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(256, 3, 32, 32, generator=g), torch.rand(256, generator=g)
    tok = torch.randint(3, 30, (256, 12), generator=g)
    with thread_invariant_kernels(), torch.no_grad():
        sec, out = best(lambda: net(x, t, tok), 10)
    check = float(out.double().sum())
else:
    from advantageflow.cli import _load_policy
    from advantageflow.config import load_config
    from advantageflow.evaluation import evaluate_policy
    cfg = load_config(None, ["task.name=shapes"])
    parts = _load_policy(cfg, None)
    t = time.perf_counter()
    result = evaluate_policy(parts.policy, parts.task, parts.reward, cfg)
    sec, check = time.perf_counter() - t, result.metrics["eval/strict"]
print(json.dumps({"mode": mode, "seconds": sec, "check": check}))
"""

CASES = {"add": "x + 1, 10 M floats (ms)", "gelu": "tanh-GELU, 256 x 76 x 512 (ms)",
         "forward": "ShapesDiT forward, batch 256 (ms)", "eval": "held-out evaluation, 864 images (s)"}


def run(case: str, mode: str, threads: int) -> dict:
    env = {**os.environ, "ADVANTAGEFLOW_MALLOC": mode, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CASE, case, str(threads)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    lines = ["| case | glibc defaults | reuse freed memory | speed-up | same result |", "|---|---|---|---|---|"]
    for case in args.cases.split(","):
        system, reuse = run(case, "system", args.threads), run(case, "reuse", args.threads)
        scale = 1.0 if case == "eval" else 1000.0
        lines.append(f"| {CASES[case]} | {system['seconds'] * scale:.1f} | {reuse['seconds'] * scale:.1f} | "
                     f"{system['seconds'] / reuse['seconds']:.2f}x | {system['check'] == reuse['check']} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\n{args.threads} torch threads; each cell its own process (best of 10-20 calls; the evaluation once)\n")
    print(table)
    if args.out:
        from advantageflow.numerics import numerics_header

        cmd = "python benchmarks/cpu_malloc.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = numerics_header().strip().removeprefix("# ")
        note = f"{args.threads} torch threads; each cell its own process (best of 10-20 calls; the evaluation once)"
        Path(args.out).write_text(f"`{cmd.strip()}`\n\nMachine: {machine}\n\n{note}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
