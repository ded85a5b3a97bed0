"""How much does scoring in the background save?  Sampling batch k+1 while batch k is scored.

Real sampling: the ShapesEval DiT (the shipped weights if present, else the same architecture
randomly initialised -- the cost is identical), 32x32 RGB, Euler, no CFG.  Real rewards:
tesseract OCR (images enlarged 4x so tesseract reads them) and DDPO's JPEG
incompressibility.  Three ways to process N batches:

* ``serial``: sample, then score, batch after batch (what a loop without overlap does);
* ``async``: sample batch k+1 while :class:`AsyncRewardScorer` scores batch k on a thread;
* ``async xW``: the same with W scoring threads (OCR runs W tesseract processes).

The three modes are run interleaved ``--reps`` times and the medians reported, so that a
change of load on a shared machine hits them alike.

Usage:  python benchmarks/async_reward.py [--batches 4] [--batch-size 16] [--steps 10] [--reps 3]
            [--threads 1] [--workers 2] [--rewards ocr,jpeg_incompressibility]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from advantageflow.models.dit import DiTConfig, ShapesDiT, ShapesDiTPolicy, load_asset
from advantageflow.rewards import build_reward
from advantageflow.rewards.async_scoring import AsyncRewardScorer
from advantageflow.rollouts import SamplingSpec, generate_from_noise
from advantageflow.sampling import time_grid
from advantageflow.tasks.base import Prompt

PROMPTS = ["one red circle", "two blue squares", "a green triangle left of a yellow circle", "three red squares"]


def make_policy() -> tuple[ShapesDiTPolicy, str]:
    try:
        net, meta = load_asset()
        return ShapesDiTPolicy(net, meta), "shipped ShapesDiT"
    except FileNotFoundError:
        torch.manual_seed(0)
        return ShapesDiTPolicy(ShapesDiT(DiTConfig())), "ShapesDiT (random init)"


def sampler(policy: ShapesDiTPolicy, batch: int, steps: int):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    metadata = [{"text": p.split()[1]} for p in prompts]  # OCR target: the colour word
    spec = SamplingSpec(time_grid(steps), "euler", 1.0, batch)

    def draw(k: int) -> torch.Tensor:
        # the rollouts' sampling path; batch k's noise as this benchmark has always drawn it
        noise = torch.randn((batch, *policy.sample_shape), generator=torch.Generator().manual_seed(k))
        out = generate_from_noise(policy, [Prompt(p) for p in prompts], noise, [0] * batch, spec)
        return policy.decode(out.x0)

    return draw, prompts, metadata


def run_serial(draw, reward, prompts, metadata, n: int) -> tuple[float, list[torch.Tensor]]:
    start, scores = time.perf_counter(), []
    for k in range(n):
        scores.append(reward(draw(k), prompts, metadata))
    return time.perf_counter() - start, scores


def run_async(draw, reward, prompts, metadata, n: int, workers: int) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    with AsyncRewardScorer(reward, workers=workers) as scorer:
        futures = [scorer.submit(draw(k), prompts, metadata) for k in range(n)]
        scores = [f.result() for f in futures]
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--workers", type=int, default=2, help="threads for the 'async xW' column")
    parser.add_argument("--rewards", default="ocr,jpeg_incompressibility")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for sampling (on a small shared machine more threads than free "
                             "cores makes OpenMP spin and sampling several times slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    policy, what = make_policy()
    draw, prompts, metadata = sampler(policy, args.batch_size, args.steps)
    draw(0)  # warm-up
    t = time.perf_counter()
    for k in range(2):
        draw(k)
    t_sample = (time.perf_counter() - t) / 2
    print(f"policy: {what}; {args.batches} batches of {args.batch_size} images 32x32, {args.steps} Euler steps; "
          f"torch threads {torch.get_num_threads()}")
    print(f"sampling alone: {t_sample:.2f} s/batch; medians of {args.reps} interleaved repetitions")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n")
    print(f"| reward | score s/batch | serial s | async s | speed-up | async x{args.workers} s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in args.rewards.split(","):
        extra = {"upscale": 4} if name == "ocr" else {}
        reward = build_reward(name, extra)
        # OCR: W tesseract processes per batch as well as W batches in flight
        wide_reward = build_reward(name, {**extra, "workers": args.workers}) if name == "ocr" else reward
        images = draw(0)
        reward(images, prompts, metadata)
        t = time.perf_counter()
        reward(images, prompts, metadata)
        t_score = time.perf_counter() - t
        times: dict[str, list[float]] = {"serial": [], "async": [], "wide": []}
        for _ in range(args.reps):
            serial, s1 = run_serial(draw, reward, prompts, metadata, args.batches)
            overlapped, s2 = run_async(draw, reward, prompts, metadata, args.batches, 1)
            wide, s3 = run_async(draw, wide_reward, prompts, metadata, args.batches, args.workers)
            same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(s1, s2, s3))
            assert same, f"{name}: overlapped scores differ from serial ones"
            for key, value in (("serial", serial), ("async", overlapped), ("wide", wide)):
                times[key].append(value)
        serial, overlapped, wide = (statistics.median(times[k]) for k in ("serial", "async", "wide"))
        print(f"| {name} | {t_score:.2f} | {serial:.1f} | {overlapped:.1f} | {serial / overlapped:.2f}x "
              f"| {wide:.1f} | {serial / wide:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\nScores are identical in the three modes (checked).  Ideal async time is about "
          "N * max(sample, score); serial is N * (sample + score).")


if __name__ == "__main__":
    main()
