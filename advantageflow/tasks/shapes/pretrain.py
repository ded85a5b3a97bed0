"""``advantageflow pretrain shapes``: pretrain the ShapesEval base model by flow matching.

Plain conditional flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on fresh
renders: ``t ~ U(0, 1)``, ``x_t = (1 - t) x0 + t eps``, loss ``||v(x_t, t, c) - (eps - x0)||^2``
with ``x0`` the render scaled to ``[-1, 1]``.  Prompts are drawn tag-uniformly from the whole
grammar (:func:`~advantageflow.tasks.shapes.grammar.all_specs`, train and test specs alike:
this is the "pretraining corpus"; the splits only separate RL prompts from evaluation
prompts).  10% of prompts are replaced by the empty prompt, for classifier-free guidance.
AdamW with a linear warm-up then a cosine decay to ``--lr-final`` at ``--steps``, and an EMA
of the weights, which is what gets saved.

Resumable: every ``--resume-every`` steps the whole state (network, EMA, optimizer, the step,
both random streams and the loss history) goes to ``OUT/resume.pt`` (written atomically); a
run started again with the same arguments and ``--out`` continues from it and ends with the
same weights as an uninterrupted run.  ``resume.pt`` is removed when the run finishes.

Writes ``--out``: ``model.safetensors`` (EMA weights) and ``config.json`` (architecture,
vocabulary, the recommended ``sampling`` settings, the pretraining arguments, wall time and
losses, and the ShapesEval accuracy measured at the end unless ``--eval-samples 0``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from advantageflow.models.dit import DiTConfig, ShapesDiT, save_asset
from advantageflow.models.unet import ShapesUNet, UNetConfig
from advantageflow.optim import lr_factor
from advantageflow.tasks.shapes.grammar import specs_for_tag, to_prompt
from advantageflow.tasks.shapes.scene import BACKGROUND, TAGS, Layout, render_specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advantageflow pretrain shapes",
        description="Pretrain the ShapesEval text-to-image flow model (a tiny DiT) on CPU renders.",
        allow_abbrev=False,
    )
    p.add_argument("--out", default="pretrained/shapes_dit", help="asset folder to write")
    p.add_argument("--steps", type=int, default=9000,
                   help="optimizer steps (the v2.0 base: 9000; the shipped one: benchmarks/pretrain_scaling.py)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock cap (0 = none); stops early and saves")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--lr-final", type=float, default=1e-4, help="learning rate at the last step (cosine decay)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty prompts")
    p.add_argument("--arch", choices=("dit", "unet"), default="dit",
                   help="network: the DiT (ShapesDiT) or a three-level U-Net with text cross-attention (ShapesUNet)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--conv-channels", type=int, default=16,
                   help="full-resolution conv channels (DiT: stem/head, 0 = none; U-Net: its top level)")
    p.add_argument("--mid-channels", type=int, default=0,
                   help="channels of a half-resolution conv stage around the transformer (DiT: 0 = none; "
                        "U-Net: its middle level, 0 = twice --conv-channels)")
    p.add_argument("--query-pos", action="store_true",
                   help="U-Net: give its text cross-attention's pixel queries their position (UNetConfig.query_pos)")
    p.add_argument("--text-segments", action="store_true",
                   help="DiT: add a learned embedding of each word's phrase (first object, "
                        "connector, second object; DiTConfig.text_segments)")
    p.add_argument("--prediction", choices=("velocity", "x0"), default="velocity",
                   help="what the network outputs: the velocity, or the clean image (x-prediction, "
                        "the loss stays on the velocity)")
    p.add_argument("--object-size", type=float, default=0.0,
                   help="draw every pretraining object this size in pixels (0 = the benchmark's 9-12)")
    p.add_argument("--centre-step", type=float, default=0.0,
                   help="put pretraining objects' centres on multiples of this many pixels (0 = anywhere)")
    p.add_argument("--tag-weights", default="", type=parse_tag_weights,
                   help="how often each tag's scenes are drawn, relative to 1 for the tags not named, "
                        "e.g. 'position=2,color_attr=2' (default: the six tags equally)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the network trains and the final evaluation samples (e.g. cuda); renders and "
                        "random draws stay on the CPU, so the data stream is the same on every device")
    p.add_argument("--init", default="", help="start from the weights of this asset folder (its architecture wins)")
    p.add_argument("--time-sampling", choices=("uniform", "logit_normal"), default="uniform",
                   help="training times: U(0, 1), or SD3's logit-normal (Esser et al. 2024, Sec. 3.1; m 0, s 1)")
    p.add_argument("--fg-weight", type=float, default=0.0,
                   help="extra loss weight on the objects' pixels (grown by 1 px); 0 = plain flow matching")
    p.add_argument("--distill-guidance", type=float, default=0.0,
                   help="guidance distillation (needs --init): the student learns the --init model's "
                        "classifier-free-guided velocity at this scale, so it samples CFG-free "
                        "(Meng et al. 2023; FLUX.1-dev is guidance-distilled); 0 = plain flow matching")
    p.add_argument("--save-every", type=int, default=0, help="also save snapshots OUT/step_K every K steps")
    p.add_argument("--resume-every", type=int, default=250, help="steps between resume states (0 = none)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance_scale recorded in config.json")
    p.add_argument("--rollout-steps", type=int, default=10, help="recommended RL rollout steps")
    p.add_argument("--eval-steps", type=int, default=20, help="recommended evaluation steps")
    p.add_argument("--eval-samples", type=int, default=9, help="samples per evaluation slot at the end (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def foreground_weights(x0: torch.Tensor, fg_weight: float) -> torch.Tensor | None:
    """Per-pixel loss weights ``(B, 1, H, W)``: ``1 + fg_weight`` on the objects' pixels
    (any channel farther than 0.05 from the background, grown by 1 px), 1 elsewhere;
    ``None`` when ``fg_weight`` is 0.  Objects cover ~10% of a scene, so plain flow matching
    spends most of its loss on the empty background; the weight moves it to the outlines
    that decide a shape (a ring's hole, a diamond's corners)."""
    if fg_weight == 0:
        return None
    bg = torch.tensor(BACKGROUND, dtype=x0.dtype, device=x0.device).view(1, 3, 1, 1) * 2 - 1
    fg = ((x0 - bg).abs().amax(dim=1, keepdim=True) > 0.1).to(x0.dtype)
    fg = torch.nn.functional.max_pool2d(fg, 3, stride=1, padding=1)
    return 1 + fg_weight * fg


def velocity_mse(v: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared velocity error; with ``weights`` ``(B, 1, H, W)`` the weighted mean
    (normalised by the weights' mean, so the loss keeps the plain loss's scale)."""
    err = (v - target) ** 2
    if weights is None:
        return err.mean()
    return (err * weights).mean() / weights.mean()


@torch.no_grad()
def guided_target(
    teacher: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
    empty_tokens: torch.Tensor, conditional: list[bool], scale: float,
) -> torch.Tensor:
    """The guidance-distillation target ``(B, 3, H, W)``: the teacher's classifier-free-guided
    velocity ``v_u + scale * (v_c - v_u)`` (Ho & Salimans 2022, Eq. 6 in velocity form) for
    the rows with a prompt, its unconditional velocity ``v_u`` for the empty-prompt rows (so
    the student keeps an unconditional branch for CFG).  Meng et al. 2023 ("On Distillation
    of Guided Diffusion Models"), stage one at one fixed scale."""
    v_c = teacher(x_t, t, tokens)
    v_u = teacher(x_t, t, empty_tokens)
    guided = v_u + scale * (v_c - v_u)
    keep = torch.tensor(conditional, dtype=torch.bool, device=x_t.device).view(-1, 1, 1, 1)
    return torch.where(keep, guided, v_u)


# arguments that do not change the weights (beyond float rounding): a resumed run may differ in these
_RESUME_FREE = ("minutes", "no_progress", "eval_samples", "save_every", "resume_every", "device")


def _named_tag_weights(text: str) -> dict[str, float]:
    """The weights ``--tag-weights`` names ('TAG=W,...', W > 0, tags of :data:`TAGS`), checked."""
    named = {}
    for item in filter(None, text.split(",")):
        tag, sep, value = item.partition("=")
        if tag.strip() not in TAGS or not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TAG=WEIGHT with TAG one of {', '.join(TAGS)}")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not weight > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number > 0")
        named[tag.strip()] = weight
    return named


def parse_tag_weights(text: str) -> str:
    """Check ``--tag-weights``; returns it unchanged (a string, so that ``config.json`` records
    what was typed)."""
    _named_tag_weights(text)
    return text


def tag_weights(text: str) -> tuple[float, ...] | None:
    """Per-tag draw weights in :data:`TAGS` order from ``--tag-weights``; ``None`` for equal ones."""
    named = _named_tag_weights(text)
    weights = tuple(named.get(tag, 1.0) for tag in TAGS)
    return None if len(set(weights)) == 1 else weights


def sample_batch(
    rng: random.Random, batch: int, cfg_dropout: float, layout: Layout | None = None,
    weights: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """``(B, 3, 32, 32)`` renders in ``[-1, 1]`` and their prompts ('' for dropped ones); tags drawn
    equally, or by ``weights`` (:func:`tag_weights`; equal weights keep the equal draw's stream)."""
    def tag() -> str:
        return rng.choice(TAGS) if weights is None else rng.choices(TAGS, weights)[0]

    specs = [rng.choice(_SPECS[tag()]) for _ in range(batch)]
    images, _ = render_specs(specs, rng, layout=layout)
    prompts = ["" if rng.random() < cfg_dropout else to_prompt(s) for s in specs]
    return images * 2 - 1, prompts


_SPECS = {tag: specs_for_tag(tag) for tag in TAGS}


def _new_network(args: argparse.Namespace) -> torch.nn.Module:
    """The untrained network the arguments describe (``--arch``)."""
    if args.query_pos and args.arch != "unet":
        raise SystemExit("error: --query-pos is a U-Net option (add --arch unet)")
    if args.text_segments and args.arch != "dit":
        raise SystemExit("error: --text-segments is a DiT option (drop --arch unet)")
    if args.arch == "unet":
        if args.prediction != "velocity":
            raise SystemExit("error: --arch unet predicts the velocity only (drop --prediction)")
        return ShapesUNet(UNetConfig(base_channels=args.conv_channels,
                                     mid_channels=args.mid_channels or 2 * args.conv_channels,
                                     width=args.width, depth=args.depth, heads=args.heads,
                                     query_pos=args.query_pos))
    return ShapesDiT(DiTConfig(patch=args.patch, width=args.width, depth=args.depth, heads=args.heads,
                               conv_channels=args.conv_channels, mid_channels=args.mid_channels,
                               prediction=args.prediction, text_segments=args.text_segments))


def _meta(args: argparse.Namespace, extra: dict) -> dict:
    return {
        "sampling": {
            "solver": "euler",
            "steps": args.rollout_steps,
            "eval_steps": args.eval_steps,
            "guidance_scale": args.guidance,
            "shift": 1.0,
        },
        "pretrain": {**{k: v for k, v in vars(args).items() if k not in ("no_progress",)}, **extra},
    }


def _resume_state(out: Path, args: argparse.Namespace) -> dict | None:
    """The saved state of an unfinished run in ``out`` with the same arguments, if any."""
    path = out / "resume.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    defaults = vars(build_parser().parse_args([]))  # arguments added since the state was saved
    saved = {k: v for k, v in {**defaults, **state["args"]}.items() if k not in _RESUME_FREE and k != "out"}
    now = {k: v for k, v in vars(args).items() if k not in _RESUME_FREE and k != "out"}
    if saved != now:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {now.get(k)}"
                         for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
        raise SystemExit(f"error: '{out}' holds an unfinished run with other arguments ({diff}); "
                         "use those arguments to resume it, or another --out")
    return state


def _save_resume_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "resume.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "resume.pt")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) pretraining; returns a process exit code."""
    args = build_parser().parse_args(argv)
    from advantageflow.models.dit import tokenize

    out = Path(args.out)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    net = _new_network(args)
    cfg = net.cfg
    if args.init:
        from advantageflow.models.dit import load_asset

        net, _ = load_asset(args.init)
        net.train()
        cfg = net.cfg
    device = torch.device(args.device)
    net = net.to(device)
    teacher = None
    if args.distill_guidance:
        if not args.init:
            raise SystemExit("error: --distill-guidance needs --init (the teacher whose guided velocity is learned)")
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
        empty_tokens = tokenize([""] * args.batch_size, cfg.max_tokens).to(device)  # the same every step
    layout = Layout(size=args.object_size, centre_step=args.centre_step)
    draw_weights = tag_weights(args.tag_weights)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    final_ratio = args.lr_final / args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, args.warmup, args.steps, final_ratio))
    losses: list[float] = []
    step, wall_before, cpu_before = 0, 0.0, 0.0
    state = _resume_state(out, args)
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        noise_gen.set_state(state["noise_gen"])
        losses, step = state["losses"], state["step"]
        wall_before, cpu_before = state["wall_s"], state["cpu_s"]
        print(f"resuming the unfinished run in {out} at step {step}", flush=True)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{type(net).__name__}: {n_params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch_size}; "
          f"writing {out}", flush=True)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="pretrain shapes", unit="step", file=sys.stderr)
    start, cpu_start = time.time(), time.process_time()

    def elapsed() -> tuple[float, float]:
        return wall_before + time.time() - start, cpu_before + time.process_time() - cpu_start

    while step < args.steps:
        step += 1
        x0, prompts = sample_batch(rng, args.batch_size, args.cfg_dropout, layout, draw_weights)
        tokens = tokenize(prompts, cfg.max_tokens).to(device)
        eps = torch.randn(x0.shape, generator=noise_gen)
        if args.time_sampling == "logit_normal":
            t = torch.sigmoid(torch.randn(x0.shape[0], generator=noise_gen))
        else:
            t = torch.rand(x0.shape[0], generator=noise_gen)
        x0, eps, t = x0.to(device), eps.to(device), t.to(device)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        if teacher is not None:
            target = guided_target(teacher, x_t, t, tokens, empty_tokens, [p != "" for p in prompts],
                                   args.distill_guidance)
        else:
            target = eps - x0
        loss = velocity_mse(net(x_t, t, tokens), target, foreground_weights(x0, args.fg_weight))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        elif step % 100 == 0:
            print(f"step {step} loss {sum(losses[-100:]) / 100:.4f} {elapsed()[0]:.0f}s", flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            snap = {"steps_done": step, "wall_s": round(elapsed()[0], 1), "snapshot_of_longer_run": True}
            save_asset(ema, _meta(args, snap), out / f"step_{step}")
        if args.resume_every and step % args.resume_every == 0 and step < args.steps:
            wall, cpu = elapsed()
            _save_resume_state(out, {
                "args": vars(args), "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": rng.getstate(), "noise_gen": noise_gen.get_state(),
                "losses": losses, "step": step, "wall_s": wall, "cpu_s": cpu,
            })
        if args.minutes and elapsed()[0] > args.minutes * 60:
            print(f"time cap of {args.minutes} min reached after {step} steps; saving", flush=True)
            break
    if bar is not None:
        bar.close()
    wall, cpu = elapsed()
    tail = losses[-200:]
    extra = {
        "command": "advantageflow pretrain shapes " + " ".join(argv if argv is not None else sys.argv[3:]),
        "steps_done": step,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "images_per_s": round(step * args.batch_size / max(wall, 1e-9), 1),
        "final_loss": round(sum(tail) / max(len(tail), 1), 5),
        "loss_curve": [round(sum(losses[i : i + 250]) / len(losses[i : i + 250]), 5)
                       for i in range(0, len(losses), 250)],
        "parameters": n_params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "resumed": state is not None,
    }
    meta = _meta(args, extra)
    save_asset(ema, meta, out)
    (out / "resume.pt").unlink(missing_ok=True)
    print(f"saved {out} after {step} steps in {wall / 60:.1f} min (loss {extra['final_loss']})", flush=True)
    if args.eval_samples > 0:
        from advantageflow.tasks.shapes.evaluator import evaluate_checkpoint

        result = evaluate_checkpoint(str(out), samples_per_prompt=args.eval_samples, seed=args.seed,
                                     device=args.device)
        meta["eval"] = result
        save_asset(ema, meta, out)
        print(json.dumps(result, indent=2), flush=True)
    return 0 if math.isfinite(extra["final_loss"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
