"""How fast can this CPU run the main job and the held-out evaluation?  A lower bound from FLOPs.

Issue 13 asks for the main job's +0.20 within 5 minutes of training and one held-out
evaluation within 30 s on a 2-core machine.  Both are counted in FLOPs by the trainer
(``perf/flops``, ``perf/eval_flops``: :mod:`advantageflow.compute`), so this script sets them
against what the machine can do, in one run:

- **sgemm peak**: the rate of the fastest of 20 large float32 matrix products (1024 x 1024 x 1024) through
  torch with MKL in the trainer's strict reproducible mode (importing :mod:`advantageflow` sets
  it), at ``--threads``.  No network layer of the shipped DiT runs faster than this, so
  ``FLOPs / peak`` is a lower bound on any time the machine can reach with these settings,
  whatever the kernels.
- **the shipped DiT's own rates** under the trainer's kernels (``thread_invariant_kernels``):
  forward rows at the evaluation's batch (no grad) and forward + backward rows at the main
  job's micro-batch, with FLOPs from ``torch.utils.flop_counter``.
- **the main job, measured**: ``train.epochs=1`` of the shipped config (no evaluation), its
  ``perf/flops``, rollout and update seconds; then the shipped config's epochs at the measured
  rate and at the peak.
- **one held-out evaluation, measured** (``--eval``, about 100 s on the 2-core AMD EPYC):
  what ``advantageflow eval --task shapes`` runs, timed, with its FLOPs.

    python benchmarks/cpu_bounds.py --eval          # writes benchmarks/results/cpu_bounds.{md,json}

Run it on an otherwise idle machine: the rates are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import advantageflow  # noqa: E402,F401  (sets MKL's strict reproducible mode before MKL's first call)
from advantageflow.config import load_config  # noqa: E402
from advantageflow.numerics import numerics_record, thread_invariant_kernels  # noqa: E402
from benchmarks.common import best_time, git_commit, machine_line  # noqa: E402

GEMM_N = 1024


def sgemm_peak() -> float:
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    return 2.0 * GEMM_N**3 / best_time(lambda: a @ b, repeats=20)


def network_rates(fwd_batch: int, train_batch: int) -> dict:
    """Forward (no grad) and forward + backward FLOP/s of the shipped DiT under the trainer's kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    from advantageflow.models.dit import load_asset, tokenize

    net, _ = load_asset()
    out = {}
    for name, batch, grad in (("forward", fwd_batch, False), ("forward+backward", train_batch, True)):
        x, t = torch.randn(batch, 3, 32, 32), torch.rand(batch)
        tokens = tokenize(["two red circles left of a blue square"] * batch, net.cfg.max_tokens)

        def work(x=x, t=t, tokens=tokens, grad=grad):
            if grad:
                net.zero_grad(set_to_none=True)
                net(x, t, tokens).square().mean().backward()
            else:
                with torch.no_grad():
                    net(x, t, tokens)

        with FlopCounterMode(display=False) as counter:
            work()
        flops = float(counter.get_total_flops())
        with thread_invariant_kernels():
            rate = flops / best_time(work, repeats=3)
        out[name] = {"batch": batch, "flops_per_row": flops / batch, "flop_per_s": rate,
                     "ms_per_row": 1e3 * flops / batch / rate}
    return out


def main_job_epoch(extra: tuple[str, ...] = ()) -> dict:
    """One epoch of the shipped main job (no evaluation; ``extra`` overrides): its FLOPs and phase times."""
    from advantageflow.runlog import read_metrics
    from advantageflow.trainer import train

    overrides = ["train.epochs=1", "eval.every=0", "log.progress=false", "log.tensorboard=false",
                 "checkpoint.every=100", *extra]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        rows = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "perf/flops" in r]
    row = rows[-1]
    return {"epochs": cfg.train.epochs, "flops": row["perf/flops"], "rollout_s": row["perf/rollout_s"],
            "train_s": row["perf/train_s"], "epoch_s": row["perf/epoch_s"]}


def held_out_evaluation() -> dict:
    """``advantageflow eval --task shapes`` on the shipped base, timed, with its FLOPs."""
    from advantageflow.build import build_components
    from advantageflow.compute import ComputeMeter
    from advantageflow.evaluation import evaluate_policy

    cfg = load_config(None, [])
    parts = build_components(cfg, "cpu")
    meter = ComputeMeter.for_policy(parts.policy)
    start = time.perf_counter()
    with meter.evaluating():
        result = evaluate_policy(parts.policy, parts.task, parts.reward, cfg)
    seconds = time.perf_counter() - start
    counts = meter.take()
    meter.close()
    return {"seconds": seconds, "flops": counts["perf/eval_flops"], "rows": int(counts["perf/eval_network_rows_fwd"]),
            "images": cfg.eval.num_prompts * cfg.eval.samples_per_prompt, "strict": result.metrics["eval/strict"]}


def write_report(res: dict, out: Path) -> str:
    peak = res["sgemm_flop_per_s"]
    net = res["network"]
    job = res["main_job_epoch"]
    epochs = res["main_job_epochs"]
    total = job["flops"] * epochs
    lines = [
        f"# What this CPU can do for the main job and the held-out evaluation ({res['machine']['cpu']}, "
        f"{res['threads']} threads)",
        "",
        "`python benchmarks/cpu_bounds.py" + (" --eval" if "evaluation" in res else "") + "` "
        f"({res['date']}, torch {res['machine']['torch']}, MKL {res['machine']['mkl_cbwr']} on branch "
        f"{res['machine']['mkl_branch']}; commit {res.get('commit', '?')}; {res.get('machine_line', '')}). "
        "Rates are the fastest of the timed calls after a warm-up; FLOPs are "
        "`torch.utils.flop_counter`'s (matrix products, convolutions, attention), as the trainer counts them.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| sgemm peak ({GEMM_N}^3 float32) | {peak / 1e9:.1f} GFLOP/s |",
    ]
    for name, r in net.items():
        lines.append(f"| shipped DiT {name}, batch {r['batch']} (trainer's kernels) | {r['flop_per_s'] / 1e9:.1f} "
                     f"GFLOP/s ({r['flop_per_s'] / peak:.0%} of peak; {r['ms_per_row']:.2f} ms per row of "
                     f"{r['flops_per_row'] / 1e6:.0f} MFLOP) |")
    lines += [
        f"| main job, one epoch: FLOPs (`perf/flops`) | {job['flops']:.3g} |",
        f"| main job, one epoch: measured | {job['epoch_s']:.1f} s (rollouts {job['rollout_s']:.1f} s, "
        f"update {job['train_s']:.1f} s); {job['flops'] / job['epoch_s'] / 1e9:.1f} GFLOP/s |",
        f"| main job, {epochs} epochs ({total:.3g} FLOPs): at the measured epoch | "
        f"{epochs * job['epoch_s'] / 60:.1f} min |",
        f"| main job, {epochs} epochs: **at the sgemm peak (lower bound)** | **{total / peak / 60:.1f} min** |",
    ]
    if "evaluation" in res:
        ev = res["evaluation"]
        lines += [
            f"| held-out evaluation ({ev['images']} images, {ev['rows']} network rows): FLOPs | {ev['flops']:.3g} |",
            f"| held-out evaluation: measured | {ev['seconds']:.1f} s (strict {ev['strict']:.4f}); "
            f"{ev['flops'] / ev['seconds'] / 1e9:.1f} GFLOP/s |",
            f"| held-out evaluation: **at the sgemm peak (lower bound)** | **{ev['flops'] / peak:.1f} s** |",
        ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval", action="store_true", help="also time one held-out evaluation (~100 s on 2 AMD cores)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_bounds"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = numerics_record()
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine_line": machine_line(),
        "threads": args.threads,
        "machine": {"cpu": record["cpu"], "torch": torch.__version__,
                    "mkl_cbwr": record.get("mkl_cbwr"), "mkl_branch": record.get("mkl_branch")},
        "sgemm_flop_per_s": sgemm_peak(),
        "network": network_rates(fwd_batch=256, train_batch=64),
        "main_job_epochs": load_config(None, []).train.epochs,
    }
    res["main_job_epoch"] = main_job_epoch()
    if args.eval:
        res["evaluation"] = held_out_evaluation()
    print(write_report(res, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
