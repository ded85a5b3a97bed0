"""Rollout and training throughput of every algorithm against the bare network, and peak memory.

For each model (the 2-D task's MLP; the ShapesEval DiT: the shipped base model, or the
default architecture with random weights before it ships -- the cost is the same) and each
algorithm, with the real trainer pieces:

- **rollouts**: ``advantageflow.rollouts.generate`` with the algorithm's ``sampler_request``
  (SDE + log-probs for Flow-GRPO, a kept trajectory for DRaFT, DPM++2M for DiffusionNFT);
  images/s.
- **training**: one optimizer step over the rollout batch exactly as the trainer takes it
  (micro-batches, each loss term back-propagated as it comes, clipping, AdamW step,
  ``after_step``); samples/s.  Advantages are group-normalised random rewards: rewards are
  the task's business and are left out of both numbers.
- **the bare network in the same run**: batched forward rows/s (no grad) and forward +
  backward rows/s of the same ``nn.Module`` on random inputs.  Every call of that module
  inside rollouts and losses is counted (rows, with or without grad) by a forward hook, so
  the *ideal* time of a phase is ``rows_no_grad / fwd_rate + rows_grad / fwd_bwd_rate`` and
  **overhead = measured time / ideal time** (1.00 = no plumbing cost; above 1, the cost of
  everything that is not the network: solver arithmetic, log-probs, copies, Python).

Peak memory (``--memory``): one fresh subprocess per (algorithm, sampling steps); it builds
the policy and the algorithm, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
records the current RSS, runs one rollout + one training step, and reports
``VmHWM - RSS before`` (the process's resident peak during the iteration: activations,
gradients, optimizer state, kept trajectories, allocator slack), plus the exact bytes of the
tensors the rollout keeps (``x0``, noise, trajectory, log-probs).

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py            # larger batches, more repeats, steps 10/20/40

Writes ``benchmarks/results/throughput[_quick].md`` / ``.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    ROOT,
    best_time,
    command_line,
    git_commit,
    machine_line,
    markdown_table,
    set_threads,
)

ALGOS = ("advantageflow", "awm", "diffusion_nft", "epg", "ram", "flow_grpo", "draft")
MODELS = ("toy_mlp", "shapes_dit")


class BrightnessReward:
    """A differentiable stand-in reward for DRaFT on the DiT: mean pixel value, ``(B,)``."""

    differentiable = True

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


@dataclass
class Setup:
    """A policy, its bare network, prompts and the DRaFT reward for one model."""

    name: str
    policy: Any
    net: torch.nn.Module
    prompts: list
    reward: Any

    def raw_call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.name == "toy_mlp":
            return self.net(x, t)
        tokens = self.policy.encode([p.text for p in self.prompts[: 1]])["tokens"].expand(x.shape[0], -1)
        return self.net(x, t, tokens)


def make_setup(model: str, toy_options: dict | None = None) -> Setup:
    from advantageflow.tasks.base import Prompt

    if model == "toy_mlp":
        from advantageflow.models.toy import ToyMLPPolicy
        from advantageflow.tasks.toy2d import SmoothModeReward

        policy = ToyMLPPolicy.from_config(ToyMLPPolicy.Config(**(toy_options or {})))
        return Setup(model, policy, policy.net, [Prompt("")], SmoothModeReward())
    from advantageflow.models.dit import DiTConfig, ShapesDiT, ShapesDiTPolicy, load_asset
    from advantageflow.tasks.shapes.task import ShapesTask

    try:  # the shipped base model; else the default architecture, randomly initialised
        net, meta = load_asset()
    except FileNotFoundError:
        torch.manual_seed(0)
        net, meta = ShapesDiT(DiTConfig()), {}
    policy = ShapesDiTPolicy(net, meta, "cpu")
    return Setup(model, policy, policy.net, ShapesTask().train_prompts(), BrightnessReward())


def make_algo(name: str, policy: Any) -> tuple[Any, Any]:
    """The algorithm with its configs/toy2d_<name>.yaml hyper-parameters, and that config."""
    from advantageflow.algorithms import ALGORITHMS
    from advantageflow.config import load_config

    cfg = load_config(str(ROOT / "configs" / f"toy2d_{name}.yaml"))
    return ALGORITHMS.get(name)(cfg.algorithm, policy), cfg


class CallCounter:
    """Rows through every module of ``net``'s class (global forward hook), with or without grad."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.grad = self.no_grad = 0
        self._kind = type(net)  # also the frozen reference / EMA copies of the same network
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if type(module) is not self._kind:
            return
        if torch.is_grad_enabled():
            self.grad += inputs[0].shape[0]
        else:
            self.no_grad += inputs[0].shape[0]

    def reset(self) -> None:
        self.grad = self.no_grad = 0

    def close(self) -> None:
        self._handle.remove()


def raw_rates(setup: Setup, fwd_batch: int, bwd_batch: int, repeats: int) -> tuple[float, float]:
    """Bare ``nn.Module`` rows/s: forward (no grad) at ``fwd_batch``, fwd + bwd at ``bwd_batch``."""
    shape = tuple(setup.policy.sample_shape)
    net = setup.net

    def fwd():
        with torch.no_grad():
            setup.raw_call(torch.randn(fwd_batch, *shape), torch.rand(fwd_batch))

    def fwd_bwd():
        out = setup.raw_call(torch.randn(bwd_batch, *shape), torch.rand(bwd_batch))
        out.square().mean().backward()
        net.zero_grad(set_to_none=True)

    return fwd_batch / best_time(fwd, repeats), bwd_batch / best_time(fwd_bwd, repeats)


def rollout_batch(setup: Setup, algo: Any, batch: int, group: int, steps: int, seed: int = 0):
    from advantageflow.advantages import group_advantages
    from advantageflow.rollouts import SamplingSpec, generate
    from advantageflow.sampling import time_grid
    from advantageflow.seeding import rollout_noise_key, sampler_key, seeded_generator

    prompts = [setup.prompts[(i // group) % len(setup.prompts)] for i in range(batch)]
    request = algo.sampler_request(0, seeded_generator(*sampler_key(seed, 0)))
    spec = SamplingSpec(time_grid(steps), "euler", 1.0, 256, request)
    # (the benchmark's noise keys: epoch 0, sample i)
    rollout = generate(setup.policy, prompts, [rollout_noise_key(seed, 0, i) for i in range(batch)],
                       [i // group for i in range(batch)], spec)
    rewards = torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    adv = group_advantages(rewards, rollout.group_ids, "global", 5.0)
    return rollout.with_(rewards=rewards, advantages=adv.values.float())


def train_step(setup: Setup, algo: Any, optimizer: Any, rollout: Any, micro: int, step: int,
               after_backward: Any = None) -> None:
    """One optimizer step over ``rollout`` as the trainer takes it (``after_backward()`` is
    called after each loss term's backward)."""
    from advantageflow.algorithms.base import TrainContext
    from advantageflow.rollouts import seeded_generator

    policy = setup.policy
    params = policy.trainable_parameters()
    optimizer.zero_grad(set_to_none=True)
    n = len(rollout)
    for chunk in torch.split(torch.arange(n), micro):
        ctx = TrainContext(policy=policy, generator=seeded_generator(0, "loss", step, int(chunk[0])), step=step,
                           reward=setup.reward)
        for term in algo.losses(rollout.select(chunk), ctx):
            (term.loss * (len(chunk) / n)).backward()
            if after_backward is not None:
                after_backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    algo.after_step(policy, step)


@dataclass
class Row:
    model: str
    algo: str
    rollout_img_s: float
    rollout_overhead: float
    rollout_nfe: float
    train_samples_s: float
    train_overhead: float
    train_grad_rows: float
    train_nograd_rows: float


@dataclass
class Measured:
    """Timings and network-row counts of one algorithm (ratios need the bare rates)."""

    model: str
    algo: str
    batch: int
    rollout_s: float
    rollout_rows: int
    train_s: float
    grad_rows: int
    nograd_rows: int

    def finish(self, fwd_rate: float, bwd_rate: float) -> Row:
        r_ideal = self.rollout_rows / fwd_rate
        t_ideal = self.grad_rows / bwd_rate + self.nograd_rows / fwd_rate
        b = self.batch
        return Row(self.model, self.algo, b / self.rollout_s, self.rollout_s / r_ideal, self.rollout_rows / b,
                   b / self.train_s, self.train_s / t_ideal, self.grad_rows / b, self.nograd_rows / b)


def measure_algo(setup: Setup, name: str, batch: int, group: int, steps: int, micro: int,
                 repeats: int) -> Measured:
    algo, cfg = make_algo(name, setup.policy)
    optimizer = torch.optim.AdamW(setup.policy.trainable_parameters(), lr=1e-5)
    counter = CallCounter(setup.net)
    try:
        # one untimed round (first-call allocations, old-policy snapshots)
        rollout = rollout_batch(setup, algo, batch, group, steps)
        algo.begin_epoch(setup.policy)
        train_step(setup, algo, optimizer, rollout, micro, 0)
        r_times, t_times = [], []
        for k in range(repeats):
            counter.reset()
            t0 = time.perf_counter()
            rollout = rollout_batch(setup, algo, batch, group, steps, seed=k + 1)
            r_times.append(time.perf_counter() - t0)
            r_rows = counter.no_grad + counter.grad
            counter.reset()
            algo.begin_epoch(setup.policy)
            t0 = time.perf_counter()
            train_step(setup, algo, optimizer, rollout, micro, k + 1)
            t_times.append(time.perf_counter() - t0)
            g_rows, ng_rows = counter.grad, counter.no_grad
    finally:
        counter.close()
    return Measured(setup.name, name, batch, min(r_times), r_rows, min(t_times), g_rows, ng_rows)


# ----------------------------------------------------------------------------- memory

def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_worker(model: str, name: str, steps: int, batch: int, group: int, micro: int) -> dict:
    """One iteration in this (fresh) process; peak RSS over it and the rollout's kept bytes."""
    setup = make_setup(model)
    algo, _ = make_algo(name, setup.policy)
    optimizer = torch.optim.AdamW(setup.policy.trainable_parameters(), lr=1e-5)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    rollout = rollout_batch(setup, algo, batch, group, steps)
    kept = sum(t.numel() * t.element_size() for t in (rollout.x0, rollout.noise, rollout.trajectory,
                                                      rollout.log_probs) if isinstance(t, torch.Tensor))
    after_rollout = _status("VmHWM")
    algo.begin_epoch(setup.policy)
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        train_step(setup, algo, optimizer, rollout, micro, 0, after_backward=saved.end_term)
    peak = _status("VmHWM")
    return {"model": model, "algo": name, "steps": steps, "peak_delta_mb": (peak - before) / 2**20,
            "rollout_peak_delta_mb": (after_rollout - before) / 2**20, "kept_mb": kept / 2**20,
            "saved_mb": saved.peak / 2**20, "terms": saved.terms}


class SavedBytes:
    """Bytes of the distinct tensor storages autograd saves for backward, per loss term.

    Each term's graph is freed by its backward, so the largest term is the activation memory
    the update needs at once (``peak``, bytes); parameters saved by reference count too.
    """

    def __init__(self) -> None:
        self.current: dict[int, int] = {}
        self.peak = 0
        self.terms = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            self.current[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def end_term(self) -> None:
        self.peak = max(self.peak, sum(self.current.values()))
        self.current.clear()
        self.terms += 1


def run_memory(model: str, algos: list[str], steps_list: list[int], batch: int, group: int, micro: int,
               threads: int, parallel: int) -> list[dict]:
    jobs = [(a, s) for a in algos for s in steps_list]
    results, running = [], []
    while jobs or running:
        while jobs and len(running) < parallel:
            a, s = jobs.pop(0)
            cmd = [sys.executable, __file__, "--memory-worker", f"{model},{a},{s},{batch},{group},{micro}",
                   "--threads", str(threads)]
            running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        proc = running.pop(0)
        out, err = proc.communicate()
        if proc.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
            raise RuntimeError(f"memory worker failed: {last}")
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  memory {results[-1]}", flush=True)
    return results


# ----------------------------------------------------------------------------- report

def plot(rows: list[Row], mem: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in rows}, key=MODELS.index)
    fig, axes = plt.subplots(1, len(models) + (1 if mem else 0), figsize=(5.5 * (len(models) + bool(mem)), 4.2))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r.model == model]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r.rollout_overhead for r in mine], 0.4, label="rollout overhead")
        ax.bar([x + 0.2 for x in xs], [r.train_overhead for r in mine], 0.4, label="training overhead")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [r.algo for r in mine], rotation=30, fontsize=8)
        ax.set_ylabel("measured time / bare-network time")
        ax.set_title(model)
        ax.legend(fontsize=8)
    if mem:
        ax = axes[-1]
        for algo in dict.fromkeys(m["algo"] for m in mem):
            pts = sorted((m["steps"], m["peak_delta_mb"], m["kept_mb"] + m["saved_mb"]) for m in mem
                         if m["algo"] == algo)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", marker="x", color=line.get_color())
        ax.set_xlabel("sampling steps N")
        ax.set_ylabel("MB: peak RSS (solid), kept + saved tensors (dashed)")
        ax.set_title(f"memory ({mem[0]['model']})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches, 2 repeats, memory at steps 10/40")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--steps", type=int, default=10, help="sampling steps for the throughput part")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--memory", default=None, help="model for the memory part ('none' to skip; default shapes_dit)")
    ap.add_argument("--memory-steps", default=None, help="comma list of sampling steps (default 10,20,40)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--toy-model", action="append", default=[], metavar="KEY=VALUE",
                    help="toy_mlp model option, e.g. cache_dir=DIR (repeatable)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    toy_options = {}
    for text in args.toy_model:
        key, _, value = text.partition("=")
        toy_options[key] = int(value) if value.isdigit() else value
    if args.memory_worker:
        model, algo, steps, batch, group, micro = args.memory_worker.split(",")
        print(json.dumps(memory_worker(model, algo, int(steps), int(batch), int(group), int(micro))))
        return 0

    algos = args.algos.split(",")
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"throughput: unknown model '{m}' (choose from {', '.join(MODELS)})")
    sizes = {"toy_mlp": (256, 16, 64), "shapes_dit": (32, 8, 32) if args.quick else (64, 8, 32)}
    repeats = args.repeats or (3 if args.quick else 5)
    mem_model = args.memory or "shapes_dit"
    mem_steps = [int(s) for s in (args.memory_steps or ("10,40" if args.quick else "10,20,40")).split(",")]
    stem = Path(args.out) if args.out else RESULTS / f"throughput{'_quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    t_start = time.perf_counter()

    rows: list[Row] = []
    raw: dict[str, tuple[float, float, float, float]] = {}
    for model in models:
        batch, group, micro = sizes[model]
        # The bare network is timed again before every algorithm; the best rates seen in the
        # run serve every ratio (on a shared machine the fastest timing is the least disturbed).
        results, seen = [], []
        for name in algos:
            setup = make_setup(model, toy_options)  # a fresh policy per algorithm
            seen.append(raw_rates(setup, batch, micro, 3))
            print(f"[throughput] {model}: bare network {seen[-1][0]:.0f} fwd rows/s (batch {batch}), "
                  f"{seen[-1][1]:.0f} fwd+bwd rows/s (batch {micro})", flush=True)
            results.append(measure_algo(setup, name, batch, group, args.steps, micro, repeats))
        best = (max(r[0] for r in seen), max(r[1] for r in seen))
        raw[model] = (*best, min(r[0] for r in seen), min(r[1] for r in seen))
        for m in results:
            row = m.finish(*best)
            rows.append(row)
            print(f"  {row.algo:14s} rollout {row.rollout_img_s:8.1f} img/s (x{row.rollout_overhead:.2f}), "
                  f"train {row.train_samples_s:8.1f} samples/s (x{row.train_overhead:.2f}; "
                  f"{row.train_grad_rows:.1f} grad + {row.train_nograd_rows:.1f} no-grad net rows/sample)", flush=True)

    mem: list[dict] = []
    if mem_model != "none":
        batch, group, micro = sizes[mem_model]
        print(f"[throughput] memory on {mem_model}, batch {batch}, steps {mem_steps}", flush=True)
        mem = run_memory(mem_model, algos, mem_steps, batch, group, micro, args.threads, parallel=2)

    header = ["model", "algorithm", "rollout img/s", "rollout overhead", "net rows / rollout image",
              "train samples/s", "train overhead", "grad rows / sample", "no-grad rows / sample"]
    table = markdown_table(header, [[
        r.model, r.algo, f"{r.rollout_img_s:.1f}", f"{r.rollout_overhead:.2f}x", f"{r.rollout_nfe:.1f}",
        f"{r.train_samples_s:.1f}", f"{r.train_overhead:.2f}x", f"{r.train_grad_rows:.1f}",
        f"{r.train_nograd_rows:.1f}"] for r in rows])
    raw_table = markdown_table(["model", "bare fwd rows/s (best; slowest)", "fwd batch",
                                "bare fwd+bwd rows/s (best; slowest)", "bwd batch", "rollout steps"],
                               [[m, f"{raw[m][0]:.0f} ({raw[m][2]:.0f})", str(sizes[m][0]),
                                 f"{raw[m][1]:.0f} ({raw[m][3]:.0f})", str(sizes[m][2]), str(args.steps)]
                                for m in models])
    mem_text = ""
    if mem:
        steps_sorted = sorted({m["steps"] for m in mem})
        mem_rows = []
        for algo in dict.fromkeys(m["algo"] for m in mem):
            by = {m["steps"]: m for m in mem if m["algo"] == algo}
            first, last = by[steps_sorted[0]], by[steps_sorted[-1]]
            mem_rows.append([algo, *[f"{by[s]['peak_delta_mb']:.1f}" for s in steps_sorted],
                             f"{last['peak_delta_mb'] - first['peak_delta_mb']:+.1f}",
                             *[f"{by[s]['kept_mb']:.2f}" for s in steps_sorted],
                             *[f"{by[s]['saved_mb']:.1f}" for s in steps_sorted],
                             *[str(by[s]["terms"]) for s in steps_sorted]])
        span = f"N={steps_sorted[0]}→{steps_sorted[-1]}"
        mem_table = markdown_table(
            ["algorithm", *[f"peak RSS MB, N={s}" for s in steps_sorted], f"RSS growth {span}",
             *[f"rollout kept MB, N={s}" for s in steps_sorted],
             *[f"saved activations MB, N={s}" for s in steps_sorted],
             *[f"loss terms, N={s}" for s in steps_sorted]], mem_rows)
        b, g, mb = sizes[mem_model]
        mem_text = f"""
## Peak memory against sampling steps ({mem_model}, batch {b}, micro-batch {mb})

Peak RSS over one iteration (rollout + one optimizer step) above the RSS before it, in a
fresh process per cell (`/proc/self/clear_refs` resets the kernel's peak, VmHWM is read after);
it includes activations, gradients, AdamW state (created at the first step) and allocator
slack, so cells differ by tens of MB of noise.  Two exact counts beside it: "kept" is the
size of the tensors the rollout carries into training (x0, noise, trajectory, log-probs);
"saved activations" is the largest total of distinct storages autograd saved for one loss
term's backward (``saved_tensors_hooks``; each term is back-propagated before the next is
built, as in the trainer), with the number of terms in the step.

{mem_table}
"""
    text = f"""# Throughput and memory

Command: `{command_line()}` (commit {git_commit()}, {(time.perf_counter() - t_start) / 60:.1f} min).
Machine: {machine}.

Bare network, same process, same run (timed before each algorithm; the best rates serve
every ratio, the slowest show how much the shared machine disturbed the run):

{raw_table}

Per algorithm (configs/toy2d_<algo>.yaml hyper-parameters; {args.steps} sampling steps; fastest of
{repeats} repeats).  Overhead = measured time / (network rows without grad / bare fwd rate +
rows with grad / bare fwd+bwd rate), counting every call of the network in the phase.
"net rows / rollout image" is the number of network evaluations per image (the NFE).

{table}
{mem_text}
![throughput]({stem.with_suffix('.png').name})
"""
    plot(rows, mem, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
