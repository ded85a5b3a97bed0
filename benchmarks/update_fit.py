"""What does one policy-improvement step do to a network's fit to its good and bad samples?

    python benchmarks/update_fit.py LABEL=SOURCE ... [--tag color_attr] [--prompts 16] [--steps 3]

``SOURCE`` as in ``count_errors.py``.  For each model: a group of 16 rollouts of each of the
first ``--prompts`` train-split prompts of ``--tag`` (the main job's sampler: 10 Euler steps),
scored by the main job's reward (exact-count partial credit), with group-relative advantages
(global std, clip 5) as the trainer computes them: batch ``A``.  A second batch ``B`` of the
same prompts from other noise is never trained on.  Then ``--steps`` AdamW steps (the main
job's lr 2e-4 unless ``--lr``, weight decay 1e-4, grad clip 1) on the main job's loss over
``A`` (AdvantageFlow with its trust region, ``target_radius`` 0.2, 6 stratified ``(t, eps)``
draws per sample), each step as the first of a new epoch on the same rollouts (the rollout
policy is the current network, so the anchor to it has no gradient: the main job takes one
step per epoch; the reference is the network before the steps), and after each step the fit
``||f_theta(x_t) - x0||^2`` at fixed ``(t, eps)`` draws (4 per sample) of the positive and of
the negative samples of ``A`` and of ``B``, relative to before the steps.  An update that
learns what the reward ranks raises the negatives' fit error more than the positives', on
``B`` as on ``A``; how far both move says how much one step changes the network's function.
Finally the reward of fresh rollouts of ``B``'s noise from the updated network.
``--per-module`` repeats one step with each top-level module trained alone.  Writes
``STEM.md``.  Why: RL from the CPU-made U-Net lowers its training reward on colour
attribution where RL from the DiT raises it (``docs/shapes.md``, "Why RL from the U-Nets
stalls").
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the main job's AdvantageFlow settings (advantageflow/config.py defaults of the shapes task)
DRAWS, GAMMA, LAMBDA_REF, RADIUS = 6, 1.1, 1e-3, 0.2
sys.path.insert(0, str(REPO / "benchmarks"))


@dataclass
class Batch:
    """Rollouts ``x0`` ``(B, 3, H, W)``, their conditioning, rewards and advantages ``(B,)``."""

    x0: torch.Tensor
    cond: dict
    reward: torch.Tensor
    adv: torch.Tensor


def rollouts(policy, specs, group: int, seed: int) -> Batch:
    """``group`` samples of each spec from the evaluation's noise keys of ``seed``, scored as
    the main job scores them, with the trainer's group-relative advantages."""
    from advantageflow.advantages import group_advantages
    from advantageflow.rollouts import decode_samples
    from advantageflow.tasks.shapes.evaluator import asset_sampler, generate_shapes_eval
    from advantageflow.tasks.shapes.reward import ShapesEvalReward

    out = generate_shapes_eval(policy, specs, group, replace(asset_sampler(policy), eval_steps=10), seed)
    x0, prompts = out.x0, out.prompts
    rows = [k for k in range(len(specs)) for _ in range(group)]
    reward = ShapesEvalReward()(decode_samples(policy, x0, out.spec.chunk), [p.text for p in prompts],
                                [p.metadata for p in prompts])["score"]
    adv = group_advantages(reward, torch.tensor(rows), "global", 5.0).values / 5.0
    return Batch(x0, policy.encode([p.text for p in prompts]), reward, adv)


def fits(policy, batch: Batch, draws: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean over the draws of ``||f(x_t) - x0||^2`` (``draws`` ``(D, B)`` times,
    ``noise`` ``(D, B, 3, H, W)``)."""
    from advantageflow.algorithms.common import noised, x0_prediction
    from advantageflow.types import mean_flat

    out = []
    with torch.no_grad():
        for t, eps in zip(draws, noise):
            x_t = noised(batch.x0, t, eps)
            out.append(mean_flat((x0_prediction(x_t, t, policy.velocity(x_t, t, batch.cond)) - batch.x0) ** 2))
    return torch.stack(out).mean(0)


@dataclass
class Prepared:
    """The batches ``A`` (trained on) and ``B`` (fresh), the fixed probe draws of each, and
    the fits before any step (``(B,)`` per batch)."""

    a: Batch
    b: Batch
    probes: dict
    base: dict


def prepare(policy, specs, group: int, seed: int) -> Prepared:
    """Rollouts ``A`` (``seed``) and ``B`` (``seed + 1``) of the unchanged policy, and their fits."""
    a, b = rollouts(policy, specs, group, seed), rollouts(policy, specs, group, seed + 1)
    g = torch.Generator().manual_seed(seed)
    probes = {name: (torch.rand(4, len(x.x0), generator=g), torch.randn(4, *x.x0.shape, generator=g))
              for name, x in (("A", a), ("B", b))}
    base = {name: fits(policy, x, *probes[name]) for name, x in (("A", a), ("B", b))}
    return Prepared(a, b, probes, base)


def measure(policy, specs, group: int, steps: int, seed: int, only: str = "",
            lr: float = 2e-4, optimizer: str = "adamw", prepared: Prepared | None = None) -> list[dict[str, float]]:
    """Per step: relative fit change of A's / B's positives and negatives, and (last row) the
    fresh reward on B's noise.  ``only``: train just the parameters under that top-level module
    (the rest frozen for the measurement and restored after).  ``prepared``: :func:`prepare`'s
    result for this policy, specs, group and seed (made here if not given)."""

    saved = {name: p.detach().clone() for name, p in policy.net.named_parameters()}
    try:
        for name, p in policy.net.named_parameters():
            p.requires_grad_(not only or name.split(".")[0] == only)
        return _measure(policy, specs, group, steps, seed, lr, optimizer,
                        prepared or prepare(policy, specs, group, seed))
    finally:
        with torch.no_grad():
            for name, p in policy.net.named_parameters():
                p.copy_(saved[name])
                p.requires_grad_(True)


def _measure(policy, specs, group: int, steps: int, seed: int, lr: float,
             optimizer: str, prepared: Prepared) -> list[dict[str, float]]:
    from advantageflow.algorithms.advantageflow import trust_region_loss
    from advantageflow.algorithms.common import noised, x0_prediction

    a, b, probes, base = prepared.a, prepared.b, prepared.probes, prepared.base
    params = policy.trainable_parameters()
    if optimizer == "sgd":  # steps in proportion to the gradient, where AdamW's are about lr each
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "adamw_rel":  # each tensor's rate in proportion to its weights' size (LAMB-like)
        groups = [{"params": [p], "lr": lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-3)} for p in params]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    t_gen = torch.Generator().manual_seed(seed + 7)
    rows = []
    for step in range(1, steps + 1):
        policy.set_mode(True)
        opt.zero_grad()
        for draw in range(DRAWS):  # the main job's 6 stratified draws per sample
            t = (draw + torch.rand(len(a.x0), generator=t_gen)) / DRAWS
            x_t = noised(a.x0, t, torch.randn(a.x0.shape, generator=t_gen))
            with torch.no_grad(), policy.reference():
                f_ref = x0_prediction(x_t, t, policy.velocity(x_t, t, a.cond))
            f_theta = x0_prediction(x_t, t, policy.velocity(x_t, t, a.cond))
            loss = trust_region_loss(f_theta, a.x0, f_theta.detach(), f_ref, a.adv, GAMMA, LAMBDA_REF, RADIUS)
            (loss.mean() / DRAWS).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        policy.set_mode(False)
        row = {"step": step}
        for name, x in (("A", a), ("B", b)):
            rel = fits(policy, x, *probes[name]) / base[name] - 1
            row[f"{name}_pos"] = float(rel[x.adv > 0].mean())
            row[f"{name}_neg"] = float(rel[x.adv < 0].mean())
        rows.append(row)
    fresh = rollouts(policy, specs, group, seed + 1)
    rows[-1]["reward_B_before"] = float(b.reward.mean())
    rows[-1]["reward_B_after"] = float(fresh.reward.mean())
    return rows


def main(argv: list[str] | None = None) -> int:
    from common import write_report
    from count_errors import load_policy

    from advantageflow.tasks.shapes.grammar import splits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=SOURCE")
    p.add_argument("--tag", default="color_attr")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (the main job's AdamW: 2e-4)")
    p.add_argument("--optimizer", choices=("adamw", "sgd", "adamw_rel"), default="adamw",
                   help="sgd: plain gradient steps (no momentum, no weight decay); adamw_rel: AdamW with each "
                        "tensor's rate lr x its weights' RMS (at least 1e-3), a relative step; for comparison")
    p.add_argument("--per-module", action="store_true",
                   help="also one step of each top-level module alone (which parts move the fit)")
    p.add_argument("--out", default="update_fit", help="output stem (STEM.md)")
    args = p.parse_args(argv)
    specs = [s for s in splits()[0] if s.tag == args.tag][: args.prompts]
    lines = [
        f"{args.tag}: {args.prompts} train prompts x {args.group} rollouts, {args.optimizer} lr {args.lr:g}, "
        f"seed {args.seed}; "
        "relative change of ||f - x0||^2 at fixed (t, eps) since before the first step",
        "",
        "| model | step | A positives | A negatives | B positives | B negatives "
        "| reward on B's noise: before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in args.models:
        label, _, source = item.partition("=")
        torch.manual_seed(args.seed)
        policy = load_policy(source)
        runs = [("", args.steps)]
        if args.per_module:
            net = policy.net
            parts = [n for n, m in net.named_children() if sum(p.numel() for p in m.parameters())]
            runs += [(n, 1) for n in parts + [n for n, _ in net.named_parameters(recurse=False)]]
        prepared = prepare(policy, specs, args.group, args.seed)
        for only, steps in runs:
            size = sum(p.numel() for n, p in policy.net.named_parameters() if not only or n.split(".")[0] == only)
            for r in measure(policy, specs, args.group, steps, args.seed, only, args.lr, args.optimizer, prepared):
                after = (f"{r['reward_B_before']:.3f} -> {r['reward_B_after']:.3f}" if "reward_B_after" in r else "")
                model = f"{label} ({only} only, {size:,} parameters)" if only else label
                lines.append(f"| {model} | {r['step']} | {r['A_pos']:+.4f} | {r['A_neg']:+.4f} "
                             f"| {r['B_pos']:+.4f} | {r['B_neg']:+.4f} | {after} |")
                print(lines[-1], flush=True)
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
