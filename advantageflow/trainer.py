"""The one training loop: prompts -> group rollouts -> rewards -> advantages -> updates.

Read :func:`train` top to bottom; the algorithm only enters through its small surface
(:mod:`advantageflow.algorithms.base`), the model through the policy protocol, and every
side effect (logs, plots, checkpoints) happens on process 0 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from advantageflow.advantages import combined_advantages, group_advantages
from advantageflow.algorithms import ALGORITHMS
from advantageflow.algorithms.base import TrainContext
from advantageflow.build import build_components
from advantageflow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from advantageflow.compute import ComputeMeter, collect
from advantageflow.config import (
    Config,
    advantage_clip,
    check_resume_config,
    convention_notes,
    preflight,
    reward_keys,
)
from advantageflow.distributed import DistEnv, full_tensor, local_tensor
from advantageflow.evaluation import EvalResult, WeightsEMA, evaluate_policy
from advantageflow.faults import fault_point
from advantageflow.imagelog import log_epoch_images, start_wandb
from advantageflow.numerics import numerics_header, numerics_record, thread_invariant_kernels
from advantageflow.optim import build_optimizer, scheduled_lr
from advantageflow.parallel import finite_gradients, make_strategy
from advantageflow.rewards.async_scoring import AsyncRewardScorer
from advantageflow.rewards.base import check_reward_gradient
from advantageflow.rollouts import SamplingSpec, generate_and_score, plan_epoch
from advantageflow.runlog import (
    MetricsLogger,
    as_number,
    atomic_write_text,
    plot_curves,
    read_metrics,
    remove_stale_temporaries,
    save_samples,
)
from advantageflow.seeding import (
    RowRandom,
    loss_row_key,
    loss_step_key,
    rollout_noise_key,
    sampler_key,
    seeded_generator,
)


class TrainingError(RuntimeError):
    """The run cannot go on (bad rewards or losses for too long, unusable set-up)."""


@dataclass
class TrainResult:
    """What a finished run reports (also saved as ``summary.json``)."""

    run_dir: str
    epochs: int
    steps: int
    samples: int
    wall_s: float
    samples_per_s: float
    numerics: dict[str, Any] = field(default_factory=dict)  # what the numbers depend on (numerics.py)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    stopped_by: str = "epochs"
    compute: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopState:
    """Counters saved in every checkpoint (``trainer.json``)."""

    epoch: int = 0
    step: int = 0
    samples: int = 0
    wall_s: float = 0.0
    bad_updates: int = 0
    consecutive_bad: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)  # cumulative perf/ counters (advantageflow.compute)


def check_run_dir(run_dir: Path, min_free_mb: float = 50.0) -> None:
    """Fail before training if the run folder, its checkpoints folder or its metrics file
    cannot be written, or the disk is full (not after an epoch of work)."""
    where = run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "checkpoints"):
            where = folder
            folder.mkdir(exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        remove_stale_temporaries(run_dir)  # left by a write killed before its rename
        where = run_dir / "metrics.jsonl"
        if where.exists():
            with open(where, "a", encoding="utf-8"):
                pass
    except OSError as err:
        raise TrainingError(f"'{where}' is not writable: {err.strerror or err}") from None
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < min_free_mb:
        raise TrainingError(f"only {free_mb:.0f} MB free under '{run_dir}'; need at least {min_free_mb:.0f} MB")


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)  # first-seen order: a set's follows the hash seed
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


@thread_invariant_kernels()
def train(cfg: Config, run_dir: str | Path, resume: bool = False, env: DistEnv | None = None,
          allow_config_change: bool = False) -> TrainResult:
    """Run (or resume) the training described by ``cfg``, writing into ``run_dir``.

    On ``resume`` the config is compared with the one the checkpoint was trained with before
    anything is written (:func:`advantageflow.config.check_resume_config`).  However the run
    ends, the background reward scorer is shut down, and the process group too when this call
    initialised it (no ``env`` given).
    """
    preflight(cfg)
    with contextlib.ExitStack() as cleanup:
        if env is None:
            env = DistEnv.from_environment(cfg.device, cfg.dist.timeout_s)
            cleanup.callback(env.shutdown)  # runs last: after the scorer's shutdown
        return _train(cfg, Path(run_dir), resume, env, allow_config_change, cleanup)


def _train(
    cfg: Config, run_dir: Path, resume: bool, env: DistEnv, allow_config_change: bool, cleanup: contextlib.ExitStack
) -> TrainResult:
    """:func:`train`'s body; what must be released however it ends goes on ``cleanup``."""
    per_step = cfg.train.samples_per_epoch // cfg.train.steps_per_epoch
    if per_step % env.world_size:
        raise TrainingError(
            f"{per_step} samples per optimizer step (train.prompts_per_epoch * train.group_size / "
            f"train.steps_per_epoch) cannot be split evenly over {env.world_size} processes"
        )
    ckpt_root = run_dir / "checkpoints"
    if env.is_main:
        check_run_dir(run_dir)
        if not resume and list_checkpoints(ckpt_root):
            raise TrainingError(f"'{run_dir}' already holds checkpoints; pass --resume or use a new --run-dir")
    # The newest intact checkpoint (damaged newer ones are skipped with a warning), and the
    # config it was trained with, checked before anything in the run folder changes.
    path = latest_checkpoint(ckpt_root, warn=env.is_main) if resume else None
    config_notes: list[str] = []
    if path is not None:
        config_notes = check_resume_config(_trained_config(path), cfg, allow_config_change, str(path))
    if env.is_main:  # the run will start: say where it departs from the method's authors
        for line in convention_notes(cfg):
            print(f"[advantageflow] {line}", file=sys.stderr)
    env.barrier()

    torch.manual_seed(cfg.seed)
    parts = build_components(cfg, env.device)
    policy, task, reward = parts.policy, parts.task, parts.reward
    strategy = make_strategy(cfg.dist, env)
    strategy.wrap(policy)  # before anything holds the parameters (FSDP2 replaces them by shards)
    meter = ComputeMeter.for_policy(policy, cfg.log.flops)
    algo = ALGORITHMS.get(cfg.algo)(cfg.algorithm, policy)
    # Again on the built rewards: a factory function declares differentiability only once built.
    built = [(k, t.name, r) for k, t, r in zip(reward_keys(cfg.reward), cfg.reward.terms(), reward.rewards.values())]
    check_reward_gradient(cfg.algo, type(algo), built)
    params = policy.trainable_parameters()
    # What this process holds of them (its shards under FSDP2); gradients and AdamW's two
    # moments add three times as much.
    trainable_mb = sum(local_tensor(p).numel() * p.element_size() for p in params) / 2**20
    optimizer = build_optimizer(params, cfg.train)
    state = LoopState()
    wandb_run = start_wandb(run_dir, cfg.log.wandb_project, cfg.to_dict()) if cfg.log.wandb and env.is_main else None
    logger = MetricsLogger(run_dir, cfg.log.tensorboard, enabled=env.is_main, wandb=wandb_run)
    cleanup.callback(logger.close)  # idempotent: also finishes the W&B run on an error
    eval_ema = WeightsEMA(policy, cfg.eval.ema_decay) if cfg.eval.ema_decay > 0 else None

    if resume and path is None and env.is_main:
        print(f"[advantageflow] --resume: no complete checkpoint under '{ckpt_root}' yet; starting fresh")
        logger.truncate_after(-1)
    if path is not None:
        state = _restore(path, env, policy, strategy, optimizer, algo, cfg, eval_ema)
        logger.truncate_after(state.epoch)
        if env.is_main:
            # The summary of the run's earlier end no longer describes it; the end of this one rewrites it.
            for name in ("summary.json", "summary.txt"):
                (run_dir / name).unlink(missing_ok=True)
            print(f"[advantageflow] resumed from {path} (epoch {state.epoch}, step {state.step})")
            for note in config_notes:
                print(f"[advantageflow] resume: config change accepted: {note}")
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", numerics_header() + cfg.to_yaml())

    # Shut down on the way out (on an error without waiting for queued scores).
    scorer = cleanup.enter_context(AsyncRewardScorer(reward)) if cfg.reward.async_scoring else None
    train_prompts = task.train_prompts()
    # Encode every prompt once (diffusers policies then release their text encoders).
    policy.cache_prompts(list(dict.fromkeys(p.text for p in train_prompts + task.test_prompts())))
    sampling = SamplingSpec.for_rollouts(policy, cfg.sampler)
    run = RunParts(cfg, env, strategy, algo, policy, params, optimizer, reward)
    tc = cfg.train

    if state.epoch == 0 and cfg.eval.every > 0:
        before = _evaluate(policy, task, reward, cfg, env, run_dir, "before", meter, eval_ema)
        state.eval_before = before.metrics if before else {}
        logger.log(0, {"epoch": 0, **state.eval_before})

    # A run resumed after a budget stop (budget not raised) trains no further.
    stopped_by = _budget_spent(tc, state, env) if state.epoch < tc.epochs else ""
    bar = tqdm(
        range(state.epoch, state.epoch if stopped_by else tc.epochs), initial=state.epoch, total=tc.epochs,
        desc=f"{cfg.algo}",
        disable=not (cfg.log.progress and env.is_main), dynamic_ncols=True,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        # 1. Rollouts: this process's share of the epoch's groups.
        plan = plan_epoch(train_prompts, tc.prompts_per_epoch, tc.group_size, tc.steps_per_epoch,
                          cfg.seed, epoch, env.world_size, env.rank)
        spec = sampling.with_request(algo.sampler_request(epoch, seeded_generator(*sampler_key(cfg.seed, epoch))))
        policy.set_mode(training=False)  # rollouts: no dropout
        # 2. Rewards (scored in the background while the next chunk samples, if asked).  An
        # algorithm may roll out with other weights than theta (DiffusionNFT: its old policy).
        with algo.rollout_policy(policy):
            rollout, scored = generate_and_score(
                policy, reward, [plan.prompt_of(r) for r in plan.rows],
                [rollout_noise_key(cfg.seed, epoch, r) for r in plan.rows], [plan.group_of(r) for r in plan.rows],
                spec, scorer,
            )
        fault_point("reward")
        t_rollout = time.perf_counter() - t0
        # A diverged model samples non-finite states; never train on them (their reward is NaN).
        finite = torch.isfinite(rollout.x0.reshape(len(rollout), -1)).all(dim=1).to(scored.total.device)
        scored.total = torch.where(finite, scored.total.float(), torch.full_like(scored.total.float(), float("nan")))
        # Gathered over processes so that groups and the global std are complete.
        total = env.all_gather_cat(scored.total.float().cpu())
        components = {k: env.all_gather_cat(v.float().cpu()) for k, v in scored.components.items()}
        group_ids = env.all_gather_cat(rollout.group_ids)
        metrics: dict[str, float] = {"epoch": epoch + 1, "reward/mean": float(total.mean()),
                                     "reward/std": float(total.std(unbiased=False))}
        metrics.update({f"reward/{k}": float(v.mean()) for k, v in components.items()})
        if not bool(torch.isfinite(total).all()):
            bad = int((~torch.isfinite(total)).sum())
            state.bad_updates += 1
            state.consecutive_bad += 1
            metrics.update({"stats/nonfinite_rewards": bad, "stats/skipped_updates": state.bad_updates})
            _stop_if_too_bad(state, tc.max_bad_steps, f"{bad} non-finite rewards or samples")
        else:
            # 3. Advantages over the complete epoch, then this process's rows.
            adv = _advantages(cfg, total, components, scored.weights, group_ids)
            local = torch.arange(len(plan.rows)) + env.rank * len(plan.rows)  # gathers are rank-major
            rollout = rollout.with_(rewards=scored.total.float(), advantages=adv.values[local].to(policy.device),
                                    reward_components={k: v[local] for k, v in components.items()})
            keep = ~adv.zero_std[local] if algo.drop_zero_std_groups else None
            metrics["stats/zero_std_ratio"] = adv.zero_std_ratio
            # 4. Updates.
            t1 = time.perf_counter()
            algo.begin_epoch(policy)
            policy.set_mode(training=True)
            step_rows = []
            batch = EpochBatch(rollout, plan.rows, keep)
            for inner in range(tc.inner_epochs):
                for k in range(tc.steps_per_epoch):
                    steps_before = state.step
                    row_metrics = _optimizer_step(run, batch, state, k, inner)
                    if row_metrics is not None:
                        step_rows.append(row_metrics)
                    if eval_ema is not None and state.step > steps_before:
                        eval_ema.update(policy, state.step)
            algo.end_epoch(policy, state.step)  # once-per-epoch updates (old policies)
            metrics.update(_mean_metrics(step_rows))
            metrics["stats/zero_std_ratio"] = adv.zero_std_ratio  # the epoch-level value wins
            metrics["perf/train_s"] = time.perf_counter() - t1
        state.epoch = epoch + 1
        state.samples += tc.samples_per_epoch
        wall = time.perf_counter() - t0
        state.wall_s += wall
        metrics.update(memory_metrics(policy))
        metrics["perf/trainable_mb"] = trainable_mb
        metrics.update({"perf/rollout_s": t_rollout, "perf/epoch_s": wall,
                        "perf/samples_per_s": tc.samples_per_epoch / wall, "samples": state.samples})
        stopped_by = _budget_spent(tc, state, env) if state.epoch < tc.epochs else ""
        last = state.epoch == tc.epochs or bool(stopped_by)
        if cfg.eval.every > 0 and (state.epoch % cfg.eval.every == 0 or last):
            result = _evaluate(policy, task, reward, cfg, env, run_dir, "after" if last else None, meter, eval_ema)
            if result is not None:
                metrics.update(result.metrics)
        metrics.update(collect(meter, env, state.compute))
        logger.log(state.step, metrics)
        log_epoch_images(cfg.log, state.epoch, state.step, policy, rollout.x0, rollout.prompts, rollout.group_ids,
                         scored.total, logger)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
        if state.epoch % cfg.checkpoint.every == 0 or last:
            _save(run, ckpt_root, state, eval_ema)
        if stopped_by:
            break
    bar.close()
    if env.is_main:
        policy.write_final_exports(str(run_dir))  # e.g. model.lora.merge_at_end
    env.barrier()
    if scorer is not None:
        scorer.shutdown()
    meter.close()
    result = _finish(cfg, env, run_dir, state, logger, stopped_by or "epochs")
    logger.close()
    return result


def _trained_config(path: Path) -> dict | None:
    """The config (plain dict) recorded in checkpoint ``path`` (verified first), if any."""
    try:
        with open(path / "trainer.json", encoding="utf-8") as fh:
            recorded = json.load(fh).get("config")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint '{path}' has an unreadable trainer.json ({type(err).__name__})") from None
    return recorded if isinstance(recorded, dict) else None


def _restore(path: Path, env: DistEnv, policy, strategy, optimizer, algo, cfg: Config,
             eval_ema=None) -> LoopState:
    """Load checkpoint ``path`` into the live objects (and the evaluation EMA, kept beside the
    algorithm's state); one line if it does not fit them."""
    ckpt = load_checkpoint(path, env.device)
    try:
        policy.load_trainable_state(ckpt.policy)
        strategy.load_optimizer_state(optimizer, ckpt.optimizer)
        ema_state = ckpt.algorithm.pop(EVAL_EMA_KEY, None)
        if eval_ema is not None and ema_state is not None:
            eval_ema.load_state_dict(ema_state)
        algo.load_state_dict(ckpt.algorithm)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint '{path}' does not fit this config's model or algorithm "
                              f"({type(err).__name__}: {first})") from None
    # The optimizer's hyper-parameters are the config's (equal unless a change was allowed; the lr is
    # then set before every step by train.lr_schedule).
    for group in optimizer.param_groups:
        group.update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                     betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    loop = ckpt.trainer.get("loop")
    try:
        state = LoopState(**loop)
        if not all(isinstance(getattr(state, k), int) and getattr(state, k) >= 0
                   for k in ("epoch", "step", "samples", "bad_updates", "consecutive_bad")):
            raise ValueError("negative or non-integer counters")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' has a malformed trainer.json 'loop' ({err})") from None
    return state


def _advantages(cfg: Config, total: torch.Tensor, components: dict, weights: dict, group_ids: torch.Tensor):
    a, clip = cfg.advantage, advantage_clip(cfg)
    if cfg.reward.combine == "per_reward" and len(weights) > 1:
        return combined_advantages(components, weights, group_ids, a.std, clip, a.eps)
    return group_advantages(total, group_ids, a.std, clip, a.eps)


@dataclass
class RunParts:
    """The live objects every optimizer step (and checkpoint) of a run uses, built once."""

    cfg: Config
    env: DistEnv
    strategy: Any
    algo: Any
    policy: Any
    params: list
    optimizer: torch.optim.Optimizer
    reward: Any


@dataclass
class EpochBatch:
    """The epoch's training data: this process's rollout (rows in ``rows`` order), the global
    sample index of each row, and which rows train (``None``: all; Flow-GRPO drops zero-std groups)."""

    rollout: Any
    rows: list[int]
    keep: torch.Tensor | None = None


def _optimizer_step(run: RunParts, batch: EpochBatch, state: LoopState, k: int, inner: int):
    """One optimizer step on step-batch ``k`` of inner epoch ``inner``: micro-batches,
    accumulation, clipping.

    Each micro-batch's loss is its mean over samples; it is weighted by its share of the
    step's samples over all processes and the gradients are summed over processes (by the
    strategy, :mod:`advantageflow.parallel`), so the update equals the single-process one on
    the same global batch.  The loss's random draws are keyed by the step (draws shared by
    its batch) and by each sample's global index (per-sample draws), hence independent of the
    world size and of the micro-batch size.
    """
    cfg, env, strategy, algo, policy, params, optimizer = (
        run.cfg, run.env, run.strategy, run.algo, run.policy, run.params, run.optimizer)
    rollout, global_rows, keep = batch.rollout, batch.rows, batch.keep
    tc = cfg.train
    per_step = len(rollout) // tc.steps_per_epoch
    rows = torch.arange(k * per_step, (k + 1) * per_step)
    if keep is not None:
        rows = rows[keep[rows].cpu()]
    n_global = int(env.all_reduce_sum(torch.tensor([float(len(rows))])).item())
    if n_global == 0:
        return None
    chunks = list(torch.split(rows, tc.micro_batch_size))
    # Processes short of micro-batches (filtered groups) pad with zero-weight repeats of one row:
    # under DDP / FSDP every process must run the same passes, and each must log the same keys.
    n_chunks = max(1, env.all_reduce_max(len(chunks)) if strategy.lockstep else len(chunks))
    optimizer.zero_grad(set_to_none=True)
    metric_sums: dict[str, float] = {}
    metric_counts: dict[str, int] = {}
    loss_sum = 0.0
    for i in range(n_chunks):
        real = i < len(chunks)
        chunk = chunks[i] if real else torch.tensor([k * per_step])
        weight = len(chunk) / n_global if real else 0.0
        ctx = TrainContext(
            policy=policy, generator=seeded_generator(*loss_step_key(cfg.seed, state.epoch, inner, k)),
            rows=RowRandom([loss_row_key(cfg.seed, state.epoch, inner, global_rows[int(r)]) for r in chunk]),
            step=state.step, reward=run.reward, guidance_scale=cfg.sampler.guidance_scale,
        )
        with strategy.accumulate(last=i == n_chunks - 1):
            for term in algo.losses(rollout.select(chunk), ctx):
                (term.loss * (weight * strategy.loss_scale)).backward()
                loss_sum += float(term.loss.detach()) * weight
                for key, value in term.metrics.items():  # sample-weighted, so chunking does not matter
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * len(chunk) * real
                    metric_counts[key] = metric_counts.get(key, 0) + len(chunk) * real
    strategy.reduce_gradients(params)
    grads_ok = finite_gradients(params)
    loss_total, padded = env.all_reduce_sum(torch.tensor([loss_sum, float(n_chunks - len(chunks))])).tolist()
    grads_ok = not env.broadcast_flag(not (grads_ok and math.isfinite(loss_total)))
    out = {**_term_means(env, metric_sums, metric_counts), "loss/total": loss_total,
           "perf/padded_microbatches": padded}
    if not grads_ok:
        optimizer.zero_grad(set_to_none=True)
        state.bad_updates += 1
        state.consecutive_bad += 1
        out["stats/skipped_updates"] = state.bad_updates
        _stop_if_too_bad(state, tc.max_bad_steps, "a non-finite loss or gradient")
        return out
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf")))
    lr = scheduled_lr(tc, state.step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    fault_point("train")
    algo.after_step(policy, state.step)
    state.step += 1
    state.consecutive_bad = 0
    out["stats/grad_norm"] = float(grad_norm)
    out["stats/lr"] = lr
    return out


def memory_metrics(policy: Any) -> dict[str, float]:
    """Peak memory of this process as the policy reports it (:meth:`FlowPolicy.memory`), under ``perf/``."""
    return {k if k.startswith("perf/") else f"perf/{k}": float(v) for k, v in policy.memory().items()}


def _term_means(env: DistEnv, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Loss-term metrics averaged over the samples of every real micro-batch of every process
    (each process holds the same keys: padding micro-batches register them with count 0)."""
    keys = sorted(sums)
    if not keys:
        return {}
    totals = env.all_reduce_sum(torch.tensor([[sums[k], counts[k]] for k in keys], dtype=torch.float64))
    return {k: float(s / n) for k, (s, n) in zip(keys, totals.tolist()) if n > 0}


def _stop_if_too_bad(state: LoopState, limit: int, what: str) -> None:
    if state.consecutive_bad >= limit:
        raise TrainingError(
            f"stopping: {what} in {state.consecutive_bad} consecutive updates (train.max_bad_steps = {limit}); "
            "the last checkpoint is intact and --resume continues from it"
        )


def _budget_spent(tc, state: LoopState, env: DistEnv) -> str:
    """Which budget (``train.max_samples``, ``train.max_wall_s``; 0 = none) the run has spent,
    else ''.  Wall time is ``LoopState.wall_s`` (rollouts + rewards + updates; evaluation,
    checkpoints and start-up excluded); any process over it stops them all."""
    if tc.max_samples > 0 and state.samples >= tc.max_samples:
        return "max_samples"
    if tc.max_wall_s > 0 and env.broadcast_flag(state.wall_s >= tc.max_wall_s):
        return "max_wall_s"
    return ""


def _evaluate(policy, task, reward, cfg, env, run_dir, tag, meter: ComputeMeter, eval_ema=None) -> EvalResult:
    """Evaluate (each process samples its stripe, all get the result) with the weights, or
    their moving average when ``eval.ema_decay > 0``; process 0 saves a sample grid when
    ``tag`` is given.  Its network passes count as ``perf/eval_*``."""
    policy.set_mode(training=False)
    ema_ctx = eval_ema.active(policy) if eval_ema is not None else contextlib.nullcontext()
    with meter.evaluating(), ema_ctx:
        result = evaluate_policy(policy, task, reward, cfg, env)
    if env.is_main:
        if tag is not None:
            labels = [p.text for p in result.prompts]
            shown = result.images if result.images.dim() == 2 else result.images[:64]  # all points
            save_samples(shown, run_dir / f"samples_{tag}.png", title=f"samples {tag}",
                         labels=labels[: len(shown)] if any(labels) else None)
            atomic_write_text(run_dir / f"eval_{tag}.json",
                              json.dumps({"metrics": result.metrics, **_jsonable_details(result.details)}, indent=1))
    env.barrier()
    return result


def _jsonable_details(details: dict) -> dict:
    out = {}
    for k, v in details.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out


EVAL_EMA_KEY = "_eval_ema"  # the evaluation EMA travels in algorithm.pt under this key


def _save(run: RunParts, root: Path, state: LoopState, eval_ema=None) -> None:
    cfg, env, strategy, policy, optimizer, algo = run.cfg, run.env, run.strategy, run.policy, run.optimizer, run.algo
    # Process 0 writes; gathering sharded tensors (FSDP2) needs every process.
    if env.is_main or strategy.shards:
        policy_state, optimizer_state = policy.trainable_state(), strategy.optimizer_state(optimizer)
        algo_state = algo.state_dict()
        if eval_ema is not None:
            algo_state = {**algo_state, EVAL_EMA_KEY: eval_ema.state_dict()}
    if env.is_main:
        save_checkpoint(
            root, state.epoch, policy_state, optimizer_state, algo_state,
            {"loop": asdict(state), "algo": cfg.algo, "world_size": env.world_size,
             "strategy": strategy.name, "config": cfg.to_dict()}, keep=cfg.checkpoint.keep,
            # files for other tools beside the weights (a diffusers LoRA adapter)
            extras=lambda folder: policy.write_checkpoint_extras(policy_state, str(folder)),
        )
    env.barrier()


def _finish(cfg: Config, env: DistEnv, run_dir: Path, state: LoopState, logger: MetricsLogger,
            stopped_by: str) -> TrainResult:
    rows = read_metrics(logger.path) if env.is_main and logger.path.exists() else []
    after = {}
    for row in rows:
        after.update({k: v for k, v in row.items() if k.startswith("eval/")})
    before = state.eval_before
    result = TrainResult(
        run_dir=str(run_dir), epochs=state.epoch, steps=state.step, samples=state.samples,
        wall_s=state.wall_s, samples_per_s=state.samples / max(state.wall_s, 1e-9), numerics=numerics_record(),
        eval_before=before, eval_after=after, stopped_by=stopped_by,
        compute={k: v for k, v in state.compute.items() if v or not k.endswith("flops")},
    )
    # ShapesEval's strict_exact beside strict: a gain made by over-drawing shows in the summary line
    headline = ("eval/reward_mean", "eval/strict", "eval/strict_exact", "eval/rewarded_fraction")
    highlights = [k for k in headline if k in after]
    changes = " | ".join(f"{k[5:]} {_fmt(before.get(k))} -> {_fmt(after[k])}" for k in highlights)
    train_rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    if not changes and train_rewards:
        changes = f"train reward {_fmt(train_rewards[0])} -> {_fmt(train_rewards[-1])}"
    result.summary = (
        f"[advantageflow] {cfg.algo} on {cfg.task.name}: {changes} | {state.epoch} epochs, {state.step} steps, "
        f"{state.samples} samples in {state.wall_s:.1f}s ({result.samples_per_s:.1f} samples/s), "
        f"stopped by {stopped_by} | {run_dir}"
    )
    if env.is_main:
        plot_curves(rows, run_dir / "reward_curve.png", keys=("reward/mean", "eval/reward_mean"))
        atomic_write_text(run_dir / "summary.txt", result.summary + "\n")
        atomic_write_text(run_dir / "summary.json", json.dumps(_json_safe(asdict(result)), indent=1))
        _write_before_after(run_dir, before, after)
        print(result.summary)
    return result


def _write_before_after(run_dir: Path, before: dict, after: dict) -> None:
    keys = sorted(set(before) | set(after))
    if not keys:
        return
    lines = ["| metric | before | after |", "|---|---|---|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        lines.append(f"| {k} | {'' if b is None else _fmt(b)} | {'' if a is None else _fmt(a)} |")
    atomic_write_text(run_dir / "eval_before_after.md", "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    """A metric with 3 decimals; NaN, infinities (also as logged strings) and others as text."""
    number = as_number(value)
    if number is None:
        return "n/a" if value is None else str(value)
    return f"{number:.3f}"


def _json_safe(obj: Any) -> Any:
    """Non-finite floats as strings ("nan"), as in metrics.jsonl: strict JSON readers accept it."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
