"""How far does pretraining take the ShapesEval base: held-out strict against training images.

Issue 13 asks for a base at 0.35-0.60 held-out strict; the v2.0 base (9000 steps x 64 = 576k
renders) scored 0.152, and this benchmark's ``dit_b1024`` recipe made the base shipped since
2026-12-04 (0.600).  This benchmark trains several pretraining recipes side by side (each
an ``advantageflow pretrain shapes`` argument string: architecture, width, batch, lr, time
sampling) and evaluates each one's EMA weights with the main job's evaluation (96 slots x 9
samples, 20-step Euler, no CFG, seed 0) every time its image count doubles, so the table says
how many renders (and training FLOPs) a recipe needs to reach a given base score.

What differs from ``advantageflow pretrain shapes`` (so the curves measure the recipe, not a
schedule): the lr stays at its peak after the warm-up (no cosine decay; the evaluated EMA
weights average the last ~1/(1-ema) steps), and the renders come from one pool of scenes
rendered before training by all CPU cores (each recipe draws uniformly from it, with the 10%
empty prompts applied at draw time), so fresh renders stop being the bottleneck on a GPU.
A pool smaller than the images seen is revisited; the table gives the pool size.

    python benchmarks/pretrain_scaling.py --device cuda --budget-s 330 --pool 1200000 \
        --out benchmarks/results/pretrain_scaling_h200

Each recipe runs in its own process (on a GPU they share it; through CUDA MPS where started).
Output: ``OUT.md`` (table), ``OUT.json`` (every evaluation), ``OUT.png`` (curves) and the last
EMA weights of each recipe as an asset folder ``OUT_assets/NAME``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, git_commit, machine_line, markdown_table  # noqa: E402

SHIPPED_IMAGES = 9000 * 64
DEFAULT_RECIPES = {
    "dit_b64": "--batch-size 64 --lr 1e-3",
    "dit_b256": "--batch-size 256 --lr 2e-3",
    "dit_b256_logitnormal": "--batch-size 256 --lr 2e-3 --time-sampling logit_normal",
    "dit_w192_d6_b256": "--batch-size 256 --lr 1e-3 --width 192 --depth 6 --heads 6",
    "dit_conv32_b256": "--batch-size 256 --lr 2e-3 --conv-channels 32",
    "unet24_d3_b256": "--batch-size 256 --lr 1e-3 --arch unet --conv-channels 24 --depth 3",
    "unet32_d4_b256": "--batch-size 256 --lr 1e-3 --arch unet --conv-channels 32 --depth 4",
    "dit_b1024": "--batch-size 1024 --lr 3e-3",
}
EVAL_META = {"sampling": {"solver": "euler", "steps": 10, "eval_steps": 20, "guidance_scale": 1.0, "shift": 1.0}}


def _render_chunk(job: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, 32, 32)`` uint8 renders and ``(n, 12)`` uint8 token ids of chunk ``index``."""
    seed, index, n = job
    from advantageflow.models.dit import tokenize
    from advantageflow.tasks.shapes.pretrain import sample_batch

    torch.set_num_threads(1)
    images, prompts = sample_batch(random.Random(seed * 1_000_003 + index), n, cfg_dropout=0.0)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels, tokenize(prompts, 12).to(torch.uint8)


def render_pool(size: int, seed: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool of ``size`` pretraining scenes (the pretraining corpus: tag-uniform prompts from
    the whole grammar), rendered by ``workers`` processes."""
    chunk = 4096
    jobs = [(seed, i, min(chunk, size - i * chunk)) for i in range(math.ceil(size / chunk))]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def recipe_args(text: str) -> argparse.Namespace:
    from advantageflow.tasks.shapes.pretrain import build_parser

    return build_parser().parse_args(shlex.split(text))


def training_flops_per_image(args: argparse.Namespace) -> float:
    """FLOPs of one training pass (forward + backward) per image, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from advantageflow.models.dit import tokenize
    from advantageflow.tasks.shapes.pretrain import _new_network

    net = _new_network(args)
    x = torch.randn(4, 3, 32, 32)
    tokens = tokenize(["a red circle"] * 4, net.cfg.max_tokens)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.rand(4), tokens).square().mean().backward()
    return counter.get_total_flops() / 4


def evaluate(ema: torch.nn.Module, device: str, guidance: float = 1.0) -> dict:
    """The main job's held-out evaluation of ``ema`` (96 slots x 9, 20-step Euler, seed 0)."""
    from advantageflow.models.dit import VOCAB, ShapesDiTPolicy
    from advantageflow.tasks.shapes.evaluator import asset_sampler, evaluate_shapes_eval

    policy = ShapesDiTPolicy(copy.deepcopy(ema).eval(), {**EVAL_META, "vocab": list(VOCAB)}, device)
    sampler = asset_sampler(policy, guidance_scale=guidance, batch_size=512)
    return evaluate_shapes_eval(policy, samples_per_prompt=9, sampler=sampler, seed=0)


def train_recipe(name: str, text: str, pool_path: str, device: str, budget_s: float, seed: int,
                 out_jsonl: str, assets: str, max_images: int = 0) -> None:
    """Train one recipe from the pool for ``budget_s`` seconds of training (evaluations
    excluded) or, with ``max_images``, until the first 20-step block that reaches that many
    images, evaluating whenever the image count passes ``SHIPPED_IMAGES * 2**k / 2``."""
    from advantageflow.models.dit import save_asset, tokenize
    from advantageflow.tasks.shapes.pretrain import _new_network, velocity_mse

    torch.set_num_threads(1)
    args = recipe_args(text)
    torch.manual_seed(seed)
    pixels, tokens = torch.load(pool_path, mmap=True)
    pixels, tokens = pixels.to(device), tokens.to(device)
    n = pixels.shape[0]
    net = _new_network(args).to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    empty = tokenize([""], net.cfg.max_tokens).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    b = args.batch_size
    milestones = [SHIPPED_IMAGES * 2.0**k for k in range(-1, 8)]
    step, images, train_s = 0, 0, 0.0
    losses: list[float] = []

    def record(final: bool) -> None:
        t0 = time.time()
        row = {"recipe": name, "args": text, "steps": step, "images": images, "train_s": round(train_s, 1),
               "loss": round(sum(losses[-200:]) / max(len(losses[-200:]), 1), 5), "final": final,
               **{k: v for k, v in evaluate(ema, device).items() if not k.startswith(("partial/", "count/"))}}
        if final:
            row["strict_cfg3"] = evaluate(ema, device, guidance=3.0)["strict"]
            save_asset(ema, {**EVAL_META, "pretrain": {"scaling_recipe": text, "steps_done": step, "images": images,
                                                       "final_loss": row["loss"], "train_s": row["train_s"],
                                                       "device": device, "torch": torch.__version__}},
                       Path(assets) / name)
        row["eval_s"] = round(time.time() - t0, 1)
        with open(out_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{name}] {images / 1e6:.2f}M images, {train_s:.0f}s: strict {row['strict']:.3f}", flush=True)

    while train_s < budget_s and not (max_images and images >= max_images):
        t0 = time.time()
        for _ in range(20):
            step += 1
            idx = torch.randint(n, (b,), generator=gen, device=device)
            x0 = pixels[idx].float() / 127.5 - 1
            tok = tokens[idx].long()
            drop = torch.rand(b, generator=gen, device=device) < args.cfg_dropout
            tok = torch.where(drop[:, None], empty, tok)
            eps = torch.randn(x0.shape, generator=gen, device=device)
            if args.time_sampling == "logit_normal":
                t = torch.sigmoid(torch.randn(b, generator=gen, device=device))
            else:
                t = torch.rand(b, generator=gen, device=device)
            tb = t.view(-1, 1, 1, 1)
            loss = velocity_mse(net((1 - tb) * x0 + tb * eps, t, tok), eps - x0, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, step / max(args.warmup, 1))
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
            losses.append(loss.detach())
        losses[-20:] = [float(v) for v in losses[-20:]]
        images = step * b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s += time.time() - t0
        if milestones and images >= milestones[0]:
            while milestones and images >= milestones[0]:
                milestones.pop(0)
            record(final=False)
    record(final=True)


def write_report(rows: list[dict], out: Path, pool: int, flops: dict[str, float], recipes: dict[str, str]) -> None:
    finals = {r["recipe"]: r for r in rows if r["final"]}
    header = ["recipe", "args", "GFLOP / image", "images", "FLOPs", "held-out strict (se)", "CFG 3",
              "strict at 576k / 1.15M / 2.3M / 4.6M images"]
    table = []
    for name, text in recipes.items():
        if name not in finals:
            continue
        f = finals[name]
        marks = []
        for target in (SHIPPED_IMAGES, 2 * SHIPPED_IMAGES, 4 * SHIPPED_IMAGES, 8 * SHIPPED_IMAGES):
            hit = [r for r in rows if r["recipe"] == name and not r["final"] and target <= r["images"] < target * 1.5]
            marks.append(f"{hit[0]['strict']:.3f}" if hit else "-")
        table.append([name, f"`{text}`", f"{flops[name] / 1e9:.2f}", f"{f['images'] / 1e6:.2f}M",
                      f"{flops[name] * f['images']:.2e}", f"{f['strict']:.3f} ({f['strict_se']:.3f})",
                      f"{f['strict_cfg3']:.3f}", " / ".join(marks)])
    text = (
        "# Pretraining scaling: held-out strict against training images\n\n"
        f"`{command_line()}` (commit {git_commit()})\n\n{machine_line()}\n\n"
        f"Pool of {pool:,} rendered scenes; each recipe trained for its time budget at its peak lr (no decay), "
        f"EMA weights evaluated with the main job's evaluation (96 slots x 9, 20-step Euler, no CFG, seed 0) "
        f"whenever its image count doubled. The v2.0 base: 576k images with a cosine decay, 0.152.\n\n"
        + markdown_table(header, table) + "\n"
    )
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"pool": pool, "flops_per_image": flops, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in recipes:
            pts = sorted((r["images"], r["strict"]) for r in rows if r["recipe"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(0.35, color="grey", ls="--", lw=1)
        ax.axvline(SHIPPED_IMAGES, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training images")
        ax.set_ylabel("held-out strict (no CFG)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per recipe")
    p.add_argument("--pool", type=int, default=200_000, help="scenes rendered before training")
    p.add_argument("--render-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="names from the defaults, comma-separated")
    p.add_argument("--recipe", action="append", default=[], help="NAME=ARGS, an extra recipe")
    p.add_argument("--max-images", type=int, default=0,
                   help="also stop each recipe once it has seen this many images (0: the time budget alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/pretrain_scaling")
    p.add_argument("--work-dir", default="/tmp/pretrain_scaling")
    a = p.parse_args(argv)
    recipes = {k: DEFAULT_RECIPES[k] for k in a.recipes.split(",") if k}
    for extra in a.recipe:
        name, _, text = extra.partition("=")
        recipes[name] = text
    for text in recipes.values():
        recipe_args(text)  # fail before rendering on a bad argument
    work, out = Path(a.work_dir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    flops = {name: training_flops_per_image(recipe_args(text)) for name, text in recipes.items()}
    t0 = time.time()
    pixels, tokens = render_pool(a.pool, a.seed, a.render_workers)
    pool_path = str(work / "pool.pt")
    torch.save((pixels, tokens), pool_path)
    del pixels, tokens
    print(f"rendered a pool of {a.pool:,} scenes in {time.time() - t0:.0f} s", flush=True)
    jsonl = work / "evals.jsonl"
    jsonl.unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=train_recipe, args=(name, text, pool_path, a.device, a.budget_s, a.seed,
                                                     str(jsonl), str(out) + "_assets", a.max_images))
             for name, text in recipes.items()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    write_report(rows, out, a.pool, flops, recipes)
    return 0 if all(proc.exitcode == 0 for proc in procs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
