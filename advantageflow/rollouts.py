"""Rollout generation and scoring, with per-sample seeds.

Every random draw that shapes a rollout is keyed by what it belongs to: the prompts of epoch
``e`` by :func:`~advantageflow.seeding.prompts_key`, the noise of global sample ``i`` by
:func:`~advantageflow.seeding.rollout_noise_key`.  So a run is identical whether it is resumed
or not, and whatever the number of processes sharing the epoch (each process draws only its
own samples' noise).  How to sample (grid, solver, guidance, chunk, what the algorithm needs
kept) travels as one :class:`SamplingSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from advantageflow.faults import fault_point
from advantageflow.rewards.base import RewardResult
from advantageflow.sampling import SamplerRequest, bind_velocity, sample
from advantageflow.seeding import derive_seed, prompts_key, seeded_generator
from advantageflow.tasks.base import Prompt
from advantageflow.types import Rollout, cat_cond, index_cond


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample, built once (per run for rollouts, per evaluation) and passed whole.

    Attributes:
        grid: ``(N + 1,)`` time grid from 1 to 0 (the policy's, :meth:`FlowPolicy.time_grid`).
        solver: the config's ODE solver (``sampler.solver`` / ``sampler.eval_solver``).
        guidance_scale: CFG scale.  chunk: samples per sampler call (``sampler.batch_size``).
        request: what the algorithm needs kept (its ``sampler_request`` of the epoch); its
            ``solver``, when set, overrides :attr:`solver`.
    """

    grid: Tensor
    solver: str
    guidance_scale: float = 1.0
    chunk: int = 256
    request: SamplerRequest = field(default_factory=SamplerRequest)

    @classmethod
    def for_rollouts(cls, policy: Any, sampler: Any) -> SamplingSpec:
        """Training rollouts with the config's ``sampler`` section (``sampler.steps``)."""
        return cls(policy.time_grid(sampler.steps, sampler.shift), sampler.solver, sampler.guidance_scale,
                   sampler.batch_size)

    @classmethod
    def for_evaluation(cls, policy: Any, sampler: Any, steps: int | None = None) -> SamplingSpec:
        """Evaluation and ``advantageflow sample``: ``sampler.eval_steps`` (or ``steps``) with the
        evaluation solver, and no request (final samples only)."""
        grid = policy.time_grid(steps or sampler.eval_steps, sampler.shift)
        return cls(grid, sampler.eval_solver, sampler.guidance_scale, sampler.batch_size)

    def with_request(self, request: SamplerRequest) -> SamplingSpec:
        return replace(self, request=request)

    @property
    def solver_used(self) -> str:
        return self.request.solver or self.solver


@dataclass
class EpochPlan:
    """Which prompts an epoch samples and which of its samples this process owns.

    Attributes:
        prompts: the ``P`` prompts of the epoch.
        rows: global sample indices owned by this process (sample ``i`` has prompt
            ``prompts[i // G]`` and group id ``epoch * P + i // G``).
        group_size: ``G``.
    """

    epoch: int
    prompts: list[Prompt]
    rows: list[int]
    group_size: int

    def prompt_of(self, row: int) -> Prompt:
        return self.prompts[row // self.group_size]

    def group_of(self, row: int) -> int:
        return self.epoch * len(self.prompts) + row // self.group_size


def owned_rows(total: int, steps: int, world: int, rank: int) -> list[int]:
    """Global rows of process ``rank``: every ``world``-th row of each optimizer step's batch.

    With ``total`` samples split into ``steps`` consecutive step batches of ``b = total / steps``
    rows, process ``r`` owns rows ``k b + r, k b + r + W, ...`` of step ``k``.  A group's ``G``
    consecutive rows are thus spread over the processes (as the peers' repeat samplers do), which
    balances groups that Flow-GRPO filters out; the union over processes of each step's rows is
    the single-process step batch, and rewards are gathered before advantages, so where a
    sample lives changes nothing in the maths.
    """
    per_step = total // steps
    if per_step * steps != total or per_step % world:
        raise ValueError(
            f"{total} samples per epoch in {steps} steps cannot be split over {world} processes"
        )
    return [k * per_step + j for k in range(steps) for j in range(rank, per_step, world)]


def plan_epoch(
    train_prompts: list[Prompt],
    prompts_per_epoch: int,
    group_size: int,
    steps_per_epoch: int,
    seed: int,
    epoch: int,
    world: int = 1,
    rank: int = 0,
) -> EpochPlan:
    """Draw the epoch's prompts (with replacement) and this process's rows."""
    if not train_prompts:
        raise ValueError("the task has no training prompts")
    gen = seeded_generator(*prompts_key(seed, epoch))
    idx = torch.randint(len(train_prompts), (prompts_per_epoch,), generator=gen).tolist()
    rows = owned_rows(prompts_per_epoch * group_size, steps_per_epoch, world, rank)
    return EpochPlan(epoch, [train_prompts[i] for i in idx], rows, group_size)


def sample_noise(
    sample_shape: tuple[int, ...],
    keys: list[Any],
    steps_with_noise: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """Initial noise ``(B, *S)`` and, if asked, per-step noise ``(B, N, *S)``; sample ``b``'s
    draws come from its own generator seeded by ``keys[b]``."""
    inits, steps = [], []
    for key in keys:
        gen = seeded_generator(*key) if isinstance(key, tuple) else seeded_generator(key)
        inits.append(torch.randn(sample_shape, generator=gen))
        if steps_with_noise:
            steps.append(torch.randn((steps_with_noise, *sample_shape), generator=gen))
    init = torch.stack(inits).to(device, dtype)
    step = torch.stack(steps).to(device, dtype) if steps_with_noise else None
    return init, step


def encode_prompts(policy: Any, prompts: list[Prompt]) -> Any:
    """Conditioning for each prompt, encoding every distinct text once; a policy that
    ``conditions_on_metadata`` (an editing model's source image) is given the records themselves."""
    if policy.conditions_on_metadata:
        return policy.encode(prompts)
    texts = [p.text for p in prompts]
    unique = list(dict.fromkeys(texts))
    cond = policy.encode(unique)
    if cond is None:
        return None
    where = {t: i for i, t in enumerate(unique)}
    return index_cond(cond, torch.tensor([where[t] for t in texts]))


@torch.no_grad()
def generate(
    policy: Any, prompts: list[Prompt], noise_keys: list[Any], group_ids: list[int], spec: SamplingSpec
) -> Rollout:
    """Sample one rollout per prompt (already repeated per group member), in chunks.

    Every sampling path goes through here (training rollouts, evaluation, ``advantageflow
    sample``), so a sample's image depends only on its prompt, its key and ``spec``.

    Args:
        prompts: ``B`` prompts.  noise_keys: ``B`` seed keys (:mod:`advantageflow.seeding`).
        group_ids: ``B`` ints.  spec: how to sample.
    """
    request, chosen = spec.request, spec.solver_used
    # Per-step draws, each sample's from its own seed: SDE / CPS steps or a stochastic SA-Solver.
    needs_step_noise = request.stochastic != "none" or (chosen == "sa_solver" and request.sa_tau > 0)
    n_steps = len(spec.grid) - 1 if needs_step_noise else 0
    parts = []
    for start in range(0, len(prompts), spec.chunk):
        sl = slice(start, start + spec.chunk)
        noise, step_noise = sample_noise(tuple(policy.sample_shape), noise_keys[sl], n_steps, policy.device)
        parts.append(generate_from_noise(policy, prompts[sl], noise, group_ids[sl], spec, step_noise))
    return parts[0] if len(parts) == 1 else Rollout.concat(parts)


@torch.no_grad()
def generate_from_noise(
    policy: Any,
    prompts: list[Prompt],
    noise: Tensor,
    group_ids: list[int],
    spec: SamplingSpec,
    step_noise: Tensor | None = None,
) -> Rollout:
    """What :func:`generate` is built on: sample from given draws, in chunks of ``spec.chunk``.

    Args:
        noise: ``(B, *S)`` initial noise.  step_noise: ``(B, N, *S)`` per-step draws, needed
            when ``spec.request`` asks for SDE steps or a stochastic SA-Solver.
    """
    grid, request = spec.grid, spec.request
    parts = []
    for start in range(0, len(prompts), spec.chunk):
        sl = slice(start, start + spec.chunk)
        cond = encode_prompts(policy, prompts[sl])
        init = noise[sl].to(policy.device)
        out = sample(
            bind_velocity(policy, cond, spec.guidance_scale),
            init,
            grid.to(policy.device),
            solver=spec.solver_used,
            stochastic=request.stochastic,
            noise_level=request.noise_level,
            stochastic_steps=request.stochastic_steps,
            keep_trajectory=request.keep_trajectory,
            step_noise=None if step_noise is None else step_noise[sl].to(policy.device),
            sa_tau=request.sa_tau,
            sa_tau_window=tuple(request.sa_tau_window),
        )
        parts.append(
            Rollout(
                x0=out.x0,
                noise=init,
                cond=cond,
                prompts=[p.text for p in prompts[sl]],
                group_ids=torch.tensor(group_ids[sl], dtype=torch.long),
                grid=grid,
                metadata=[p.metadata for p in prompts[sl]],
                trajectory=out.trajectory,
                log_probs=out.log_probs,
            )
        )
    return parts[0] if len(parts) == 1 else Rollout.concat(parts)


@torch.no_grad()
def generate_and_score(
    policy: Any,
    reward: Any,
    prompts: list[Prompt],
    noise_keys: list[Any],
    group_ids: list[int],
    spec: SamplingSpec,
    scorer: Any = None,
) -> tuple[Rollout, RewardResult]:
    """Sample and score chunk by chunk; with an ``AsyncRewardScorer`` chunk ``k`` is scored in
    the background while chunk ``k + 1`` is sampled.  Same results as sampling then scoring."""
    parts, pending = [], []
    for start in range(0, len(prompts), spec.chunk):
        sl = slice(start, start + spec.chunk)
        part = generate(policy, prompts[sl], noise_keys[sl], group_ids[sl], spec)
        parts.append(part)
        fault_point("rollout")
        if scorer is not None:
            pending.append(scorer.submit(policy.decode(part.x0), part.prompts, part.metadata))
        else:
            pending.append(decode_and_score(policy, reward, part, spec.chunk)[0])
    results = [p.result() if scorer is not None else p for p in pending]
    rollout = parts[0] if len(parts) == 1 else Rollout.concat(parts)
    return rollout, concat_results(results)


def concat_results(results: list[RewardResult]) -> RewardResult:
    """One :class:`RewardResult` from the results of consecutive chunks."""
    if len(results) == 1:
        return results[0]
    total = torch.cat([r.total for r in results])
    comps = {k: torch.cat([r.components[k] for r in results]) for k in results[0].components}
    return RewardResult(total=total, components=comps, weights=results[0].weights)


@torch.no_grad()
def decode_samples(policy: Any, x0: Tensor, chunk: int = 256) -> Tensor:
    """Decoded final samples ``(B, ...)`` of states ``x0`` ``(B, *S)``, ``chunk`` at a time, on the CPU."""
    return torch.cat([policy.decode(x0[k : k + chunk]).cpu() for k in range(0, len(x0), chunk)])


@torch.no_grad()
def decode_and_score(policy: Any, reward: Any, rollout: Rollout, chunk: int = 256) -> tuple[RewardResult, Tensor]:
    """Decode final samples and score them; returns the result and the decoded samples."""
    results, images = [], []
    for start in range(0, len(rollout), chunk):
        sl = slice(start, start + chunk)
        imgs = policy.decode(rollout.x0[sl])
        results.append(reward(imgs, rollout.prompts[sl], rollout.metadata[sl]))
        images.append(imgs)
    return concat_results(results), torch.cat(images)


__all__ = [
    "SamplingSpec",
    "cat_cond",
    "decode_and_score",
    "decode_samples",
    "derive_seed",
    "generate",
    "generate_from_noise",
    "owned_rows",
    "plan_epoch",
]
