"""Training runs compared between 2 processes (under ``torchrun``) and 1 process.

``python -m tests.dist_cases OUT CASE [CASE ...]`` trains each case into ``OUT/CASE``; under
``torchrun --nproc-per-node 2`` the processes share one process group across the cases.
``tests/test_distributed.py`` runs the same cases in one process and compares the results.
Each process first writes ``OUT/wrapping-RANK.json`` (:func:`wrapping_report`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUIET = ["log.tensorboard=false", "log.progress=false"]

# Two epochs of two optimizer steps each, four micro-batches per step in one process (so DDP
# runs micro-batches under no_sync), evaluation at the end (striped over processes).
TOY_SHORT = ["train.epochs=2", "train.micro_batch_size=16", "eval.every=2", "eval.samples_per_prompt=64",
             "checkpoint.every=2", *QUIET]
TOY_ALGO_EXTRA = {
    # groups of 3 with a 0/1 reward: many zero-std groups; a group's members are spread 2 + 1
    # over the 2 processes, so filtering is uneven and the process with fewer rows pads with
    # zero-weight micro-batches.
    "flow_grpo": ["train.group_size=3", "train.prompts_per_epoch=64", "train.micro_batch_size=4"],
}
TINY_SD3 = ["model.path=tiny:sd3", "model.height=16", "model.width=16", "model.max_sequence_length=8",
            "model.lora.rank=2", "model.lora.alpha=4", "sampler.steps=2", "sampler.eval_steps=2",
            "train.epochs=1", "train.prompts_per_epoch=2", "train.group_size=2", "train.steps_per_epoch=1",
            "train.micro_batch_size=1", "train.lr=0.001", "eval.every=1", "eval.num_prompts=2",
            "eval.samples_per_prompt=1", "checkpoint.every=1", *QUIET]
SHAPES = ["train.epochs=1", "train.prompts_per_epoch=2", "train.group_size=4", "train.steps_per_epoch=1",
          "train.micro_batch_size=2", "sampler.steps=3", "sampler.eval_steps=3", "eval.every=1",
          "eval.num_prompts=2", "eval.samples_per_prompt=2", "checkpoint.every=1", *QUIET]
ALGOS = ("advantageflow", "awm", "flow_grpo", "diffusion_nft", "epg", "ram", "draft")


def case_config(name: str, toy_overrides: list[str]) -> tuple[str, list[str]]:
    """``(config file, overrides)`` of case ``name`` (``ALGO-STRATEGY`` on the 2-D task,
    ``shapes-STRATEGY``, ``sd3full-STRATEGY`` or ``sd3lora-STRATEGY``; STRATEGY ``fsdpbf16`` is
    FSDP2 with bf16 mixed precision)."""
    what, strategy = name.rsplit("-", 1)
    dist = [f"dist.strategy={strategy}"]
    if strategy == "fsdpbf16":  # FSDP2 mixed precision: bf16 compute, float32 reduction
        dist = ["dist.strategy=fsdp", "dist.fsdp_param_dtype=bfloat16"]
    if what in ALGOS:
        return str(REPO / f"configs/toy2d_{what}.yaml"), [*toy_overrides, *TOY_SHORT,
                                                          *TOY_ALGO_EXTRA.get(what, []), *dist]
    if what == "shapes":
        return str(REPO / "configs/shapes_advantageflow.yaml"), [*SHAPES, *dist]
    if what in ("sd3full", "sd3lora"):
        lora = "true" if what == "sd3lora" else "false"
        return str(REPO / "configs/sd3_tiny_advantageflow.yaml"), [*TINY_SD3, f"model.lora.enabled={lora}", *dist]
    raise ValueError(f"unknown case {name!r}")


def run_cases(out: Path, names: list[str], toy_overrides: list[str]) -> None:
    from advantageflow.config import load_config
    from advantageflow.trainer import train

    for name in names:
        path, overrides = case_config(name, toy_overrides)
        train(load_config(path, overrides), out / name)


def wrapping_report(strategy_name: str) -> dict:
    """What a strategy did to the shipped DiT in this process: whether the trained forward goes
    through DDP, and how many parameter elements this process holds (its shards under FSDP)."""
    from advantageflow.build import build_policy
    from advantageflow.config import load_config
    from advantageflow.distributed import DistEnv, is_sharded, local_tensor
    from advantageflow.parallel import make_strategy

    cfg = load_config(None, [f"dist.strategy={strategy_name}"])
    env = DistEnv.from_environment(cfg.device, cfg.dist.timeout_s)
    policy = build_policy(cfg, env.device)
    total = sum(p.numel() for p in policy.trainable_parameters())
    make_strategy(cfg.dist, env).wrap(policy)
    params = policy.trainable_parameters()
    return {
        "rank": env.rank,
        "ddp_forward": type(policy._active).__name__ == "DistributedDataParallel",
        "trained_sharded": all(is_sharded(p) for p in params),
        "reference_sharded": all(is_sharded(p) for p in policy.ref_net.parameters()),
        "elements_total": total,
        "elements_here": sum(local_tensor(p).numel() for p in params),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, toy_cache, *cases = sys.argv[1:]
    report = {s: wrapping_report(s) for s in ("ddp", "fsdp")}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"wrapping-{report['ddp']['rank']}.json").write_text(json.dumps(report))
    run_cases(Path(out_dir), cases, [f"model.cache_dir={toy_cache}", "model.pretrain_steps=1500"])
