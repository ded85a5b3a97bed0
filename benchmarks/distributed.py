"""One process against two (``torchrun``, gloo) under each strategy, on the main job's model.

The same run -- the main job (AdvantageFlow on ShapesEval, full fine-tuning of the shipped
1.3 M-parameter DiT) shortened to a few epochs without evaluation -- is launched through the
CLI as

- 1 process with 1 thread and with 2 threads (the single-process baselines on this machine);
- 2 processes x 1 thread with ``dist.strategy`` = ``ddp``, ``fsdp`` and ``allreduce``;

all with the same global batch.  For each: training samples/s (``summary.json``), what one
process holds of the trainable parameters (``perf/trainable_mb``: its shards under FSDP2;
gradients and AdamW's moments add three times as much), process 0's peak RSS, and the largest
parameter difference from the 1-process run (the maths must not change).

    python benchmarks/distributed.py --quick     # 4 epochs each (~3 min)
    python benchmarks/distributed.py             # 10 epochs each

Writes ``benchmarks/results/distributed[_quick].md``.  On a 2-core CPU, two processes cannot
beat one 2-thread process by much: the figures show what the plumbing costs, not GPU scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, command_line, git_commit, machine_line, markdown_table  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def run(label: str, nproc: int, threads: int, strategy: str, epochs: int, work: Path) -> dict:
    """Train once through the CLI; returns what the table shows."""
    run_dir = work / label
    overrides = [f"train.epochs={epochs}", "eval.every=0", f"checkpoint.every={epochs}", f"dist.strategy={strategy}",
                 "log.progress=false", "log.tensorboard=false"]
    launcher = ([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "advantageflow"]
                if nproc > 1 else [sys.executable, "-m", "advantageflow"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([*launcher, "train", *overrides, "--run-dir", str(run_dir)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "perf/trainable_mb" in r][-1]
    return {"label": label, "nproc": nproc, "threads": threads, "strategy": strategy, "wall_s": wall,
            "train_s": summary["wall_s"], "samples_per_s": summary["samples_per_s"],
            "trainable_mb": last["perf/trainable_mb"], "max_rss_gb": last.get("perf/max_memory_gb", float("nan")),
            "run_dir": str(run_dir)}


def max_param_diff(a: str, b: str) -> float:
    from advantageflow.checkpoint import latest_checkpoint, load_checkpoint

    pa = load_checkpoint(latest_checkpoint(Path(a) / "checkpoints")).policy
    pb = load_checkpoint(latest_checkpoint(Path(b) / "checkpoints")).policy
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 epochs per run instead of 10")
    parser.add_argument("--work-dir", default="", help="keep the run folders here")
    args = parser.parse_args()
    epochs = 4 if args.quick else 10
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="af-bench-dist-"))
    header_machine = machine_line()
    plan = [("1 process, 1 thread", 1, 1, "ddp"), ("1 process, 2 threads", 1, 2, "ddp"),
            ("2 x DDP", 2, 1, "ddp"), ("2 x FSDP2", 2, 1, "fsdp"), ("2 x flat all-reduce", 2, 1, "allreduce")]
    results = []
    for label, nproc, threads, strategy in plan:
        print(f"[bench] {label} ...", flush=True)
        results.append(run(label.replace(" ", "_").replace(",", ""), nproc, threads, strategy, epochs, work))
        results[-1]["label"] = label
    base = results[0]
    table = []
    for r in results:
        table.append([
            r["label"], f"{r['samples_per_s']:.1f}", f"{r['samples_per_s'] / base['samples_per_s']:.2f}x",
            f"{r['train_s']:.1f}", f"{r['trainable_mb']:.2f}", f"{r['max_rss_gb']:.2f}",
            f"{max_param_diff(base['run_dir'], r['run_dir']):.1e}",
        ])
    text = "\n".join([
        f"# Distributed: 1 process against 2 ({'quick, ' if args.quick else ''}{epochs} epochs of the main job)",
        "",
        f"`{command_line()}` at commit {git_commit()}; {header_machine}.",
        "",
        "Main job (AdvantageFlow, ShapesEval, full fine-tuning of the shipped DiT, 128 samples per epoch in 2 "
        "optimizer steps), no evaluation; every run has the same global batch.",
        "",
        markdown_table(["run", "train samples/s", "vs 1 process, 1 thread", "train s",
                        "trainable MB per process", "peak RSS GB (process 0)", "max param diff vs 1 process"], table),
        "",
        "Trainable MB: what one process holds of the parameters (FSDP2: its shard); gradients and AdamW's "
        "two moments add 3x as much.  Two processes share the machine's two cores.",
    ])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"distributed{'_quick' if args.quick else ''}.md"
    out.write_text(text + "\n")
    print(text)
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
