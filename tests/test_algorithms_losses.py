"""Each algorithm's loss against an independent re-computation, and its invariants
(ratio exactly 1 and KL exactly 0 when theta = old = ref, clipping, schedules, errors)."""

from __future__ import annotations

import math

import pytest
import torch

from advantageflow.algorithms.awm import AWM, awm_log_likelihood, scaled_grid_range
from advantageflow.algorithms.base import TrainContext
from advantageflow.algorithms.common import clipped_policy_loss, stratified_grid_indices
from advantageflow.algorithms.diffusion_nft import (
    EMA_SCHEDULES,
    DiffusionNFT,
    nft_loss,
    optimality_probability,
)
from advantageflow.algorithms.draft import DRaFT
from advantageflow.algorithms.epg import EPG, elbo_surrogate, epg_loss, velocity_gap
from advantageflow.algorithms.flow_grpo import FlowGRPO, gaussian_kl
from advantageflow.algorithms.ram import RAM, ram_loss
from advantageflow.models.toy import ToyMLPPolicy, VelocityMLP
from advantageflow.rewards import CompositeReward
from advantageflow.sampling import bind_velocity, sample, sde_step, time_grid
from advantageflow.seeding import RowRandom
from advantageflow.tasks.toy2d import ModeReward, SmoothModeReward
from advantageflow.types import Rollout


def make_policy(seed: int = 0) -> ToyMLPPolicy:
    torch.manual_seed(seed)
    return ToyMLPPolicy(VelocityMLP(2, hidden=32, depth=2))


def make_batch(policy, n: int = 16, steps: int = 10, seed: int = 0, **sampler) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    grid = time_grid(steps)
    out = sample(bind_velocity(policy, None), noise, grid, generator=g, **sampler)
    rewards = (torch.arange(n) % 3).float()
    group_ids = torch.arange(n) // 4
    adv = (torch.randn(n, generator=g) * 2.0).clamp(-5.0, 5.0)  # clipped, as the trainer hands them
    return Rollout(
        x0=out.x0, noise=noise, cond=None, prompts=[""] * n, group_ids=group_ids, grid=grid,
        metadata=[{} for _ in range(n)], trajectory=out.trajectory, log_probs=out.log_probs,
        rewards=rewards, advantages=adv,
    )


def rows(seed: int, n: int = 16) -> RowRandom:
    """The per-sample generators :func:`ctx` gives a loss (tests redraw from a fresh copy)."""
    return RowRandom([("test-rows", seed, i) for i in range(n)])


def ctx(policy, seed: int = 0, n: int = 16, **kw) -> TrainContext:
    """A loss context: the step generator and ``n`` row generators, all seeded by ``seed``."""
    return TrainContext(policy=policy, generator=torch.Generator().manual_seed(seed), step=0, rows=rows(seed, n), **kw)


def total(outputs) -> tuple[torch.Tensor, list[dict]]:
    outs = list(outputs)
    return sum(o.loss for o in outs), [o.metrics for o in outs]


def perturb_(policy, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- AWM


def test_awm_weightings_closed_forms_in_float64():
    m = torch.tensor([0.0, 0.3, 2.0], dtype=torch.float32)
    t = torch.tensor([0.2, 0.5, 0.9])
    assert awm_log_likelihood(m, t, "uniform").dtype == torch.float64
    torch.testing.assert_close(awm_log_likelihood(m, t, "uniform"), -m.double())
    torch.testing.assert_close(awm_log_likelihood(m, t, "t"), -(t * m).double())
    torch.testing.assert_close(awm_log_likelihood(m, t, "t2"), -(t**2 * m).double())
    # Generalised Huber ("ghuber"): zero at m = 0, derivative -t (m + 1e-10)^(p - 1), p = 1 is "t".
    mm = m.double().clone().requires_grad_(True)
    lp = awm_log_likelihood(mm, t, "ghuber", 0.25)
    assert lp[0].item() == 0.0
    (grad,) = torch.autograd.grad(lp.sum(), mm)
    torch.testing.assert_close(grad, -t.double() * (m.double() + 1e-10) ** -0.75)
    torch.testing.assert_close(awm_log_likelihood(m, t, "ghuber", 1.0), -(t * m).double(), rtol=0, atol=1e-12)
    # The released square-root "huber": -t (sqrt(m + 1e-10) - 1e-5), (near) zero at m = 0, slope
    # -t / (2 sqrt(m + 1e-10)); it is ghuber at p = 1/2 without the 1/p, and ignores p.
    lp = awm_log_likelihood(mm, t, "huber", 0.25)
    assert abs(lp[0].item()) < 1e-15
    (grad,) = torch.autograd.grad(lp.sum(), mm)
    torch.testing.assert_close(grad, -t.double() / (2 * (m.double() + 1e-10).sqrt()))
    torch.testing.assert_close(awm_log_likelihood(m, t, "huber"), awm_log_likelihood(m, t, "ghuber", 0.5) / 2)
    torch.testing.assert_close(awm_log_likelihood(m, t, "huber", 0.9), awm_log_likelihood(m, t, "huber"))
    with pytest.raises(ValueError, match="unknown AWM weighting"):
        awm_log_likelihood(m, t, "cubic")


def test_clipped_policy_loss_is_ppo_and_stops_gradient_outside_the_clip():
    log_ratio = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0])
    loss, ratio = clipped_policy_loss(log_ratio, adv, 0.2)
    torch.testing.assert_close(ratio.detach(), torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5]))
    # max(-A r, -A clip(r)): A>0, r=1.5 -> -1.2 (clipped, no grad); A>0, r=0.5 -> -0.5 (grad);
    # A<0, r=1.5 -> 1.5 (grad); A<0, r=0.5 -> 0.8 (clipped, no grad).
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0, -1.2, -0.5, 1.5, 0.8]))
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    torch.testing.assert_close(grad, torch.tensor([-2.0, 0.0, -0.5, 1.5, 0.0]))


def _authors_strata(count: int, low: int, high: int) -> list[list[int]]:
    """AWM's released draw, re-derived with exact fractions: edges ``low + j (high + 1 - low)
    / count`` rounded down to whole indices, stratum ``j`` = ``[e_j, e_{j+1})``."""
    from fractions import Fraction

    edges = [math.floor(low + Fraction(j * (high + 1 - low), count)) for j in range(count + 1)]
    return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("count,low,high", [(6, 1, 11), (6, 0, 11), (4, 1, 8), (3, 2, 9)])
def test_awm_strata_are_whole_indices_with_the_released_probabilities(count, low, high):
    strata = _authors_strata(count, low, high)
    if (count, low, high) == (6, 1, 11):
        assert strata == [[1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]  # as in the reading
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_grid_indices(count, low, high, g) for _ in range(6000)])
    for j, stratum in enumerate(strata):
        assert set(draws[:, j].tolist()) == set(stratum)  # draw j stays in stratum j
        for index in stratum:  # each index of a stratum of n has probability 1 / n
            freq = float((draws[:, j] == index).double().mean())
            assert freq == pytest.approx(1 / len(stratum), abs=0.025)
    # No index is ever drawn twice in one step's draw (equal-width continuous strata did ~1/4).
    assert all(len(set(row)) == count for row in draws.tolist())


def test_awm_grid_range_scales_to_the_rollout_grid():
    assert scaled_grid_range(14, 1, 11, 14) == (1, 11)
    assert scaled_grid_range(10, 1, 11, 14) == (1, 8)
    assert scaled_grid_range(2, 1, 11, 14) == (0, 1)


def _awm_reference(policy, batch, seed, cfg):
    """AWM's loss recomputed from scratch with the same draws (timesteps from the step
    generator, noise per sample)."""
    g, r = torch.Generator().manual_seed(seed), rows(seed, len(batch))
    lo, hi = scaled_grid_range(len(batch.grid) - 1, cfg.timestep_low, cfg.timestep_high, cfg.reference_steps)
    idx = stratified_grid_indices(cfg.num_timesteps, lo, hi, g)
    adv = batch.advantages.clamp(-5, 5) / 5
    out = 0.0
    with torch.no_grad():
        for i in idx.tolist():
            t = torch.full((len(batch),), float(batch.grid[i]))
            eps = r.randn(2)
            x_t = (1 - t[:, None]) * batch.x0 + t[:, None] * eps
            v = policy.velocity(x_t, t)
            with policy.reference():
                v_ref = policy.velocity(x_t, t)
            m = ((v - (eps - batch.x0)) ** 2).mean(1).double()
            policy_term = adv.double() * 1.0  # ratio 1: -A * ratio = -A, minus sign below
            reg = ((v - v_ref) ** 2).mean(1)
            out = out + (-policy_term + cfg.beta * reg.double()).mean() / len(idx)
            assert m.shape == (len(batch),)
    return out


def test_awm_on_policy_loss_matches_recomputation_and_ratio_is_one():
    policy = make_policy()
    batch = make_batch(policy)
    perturb_(policy)  # theta != ref, so the beta term is not zero
    cfg = AWM.Config(beta=0.5)
    algo = AWM(cfg, policy)
    loss, metrics = total(algo.losses(batch, ctx(policy, seed=3)))
    assert len(metrics) == cfg.num_timesteps
    assert all(m["stats/ratio_mean"] == 1.0 and m["stats/clipfrac"] == 0.0 for m in metrics)
    assert all(m["loss/ema_velocity_mse"] == 0.0 for m in metrics)  # ema == theta at the start
    expected = _awm_reference(policy, batch, 3, cfg)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_awm_on_policy_scores_the_rollout_weights_after_the_first_step():
    """The released on-policy mode: during the epoch's first optimizer step LP_old = sg(LP)
    (ratio 1); later steps score theta as it was at the rollouts, with the same (t, eps)."""
    policy = make_policy()
    batch = make_batch(policy)
    cfg = AWM.Config(policy_mode="on_policy", beta=0.0, beta_ema=0.0, weighting="t", clip_range=1e-4,
                     num_timesteps=1)
    algo = AWM(cfg, policy)
    algo.begin_epoch(policy)
    old = policy.snapshot()
    (first,) = list(algo.losses(batch, ctx(policy, seed=4)))
    assert first.metrics["stats/ratio_mean"] == 1.0
    perturb_(policy, 0.1)
    algo.after_step(policy, 0)
    (out,) = list(algo.losses(batch, ctx(policy, seed=4)))
    # Recompute LP_theta and LP_old at the same (t, eps) and check the ratio.
    g = torch.Generator().manual_seed(4)
    idx = algo.timestep_indices(batch.grid, g)
    t = torch.full((len(batch),), float(batch.grid[int(idx[0])]))
    eps = rows(4).randn(2)
    x_t = (1 - t[:, None]) * batch.x0 + t[:, None] * eps
    with torch.no_grad():
        lp = awm_log_likelihood(((policy.velocity(x_t, t) - (eps - batch.x0)) ** 2).mean(1), t, "t")
        with policy.use_parameters(old):
            lp_old = awm_log_likelihood(((policy.velocity(x_t, t) - (eps - batch.x0)) ** 2).mean(1), t, "t")
    ratio = torch.exp(lp - lp_old)
    assert out.metrics["stats/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert out.metrics["stats/ratio_mean"] != 1.0
    assert out.metrics["stats/clipfrac"] == pytest.approx(float(((ratio - 1).abs() > 1e-4).double().mean()))


def test_awm_every_step_mode_keeps_the_ratio_at_one():
    policy = make_policy()
    batch = make_batch(policy)
    algo = AWM(AWM.Config(policy_mode="every_step", beta=0.0, weighting="t", num_timesteps=1), policy)
    algo.begin_epoch(policy)
    perturb_(policy, 0.1)
    algo.after_step(policy, 0)
    (out,) = list(algo.losses(batch, ctx(policy, seed=4)))
    assert out.metrics["stats/ratio_mean"] == 1.0


def test_awm_lagged_copy_is_updated_once_per_epoch_from_step_one():
    """``d = min(0.3, 0.001 n)`` with ``n`` counted from 1 and applied once, after the epoch's
    optimizer steps: after one epoch of two steps the copy is ``0.002 init + 0.998 theta``."""
    policy = make_policy()
    algo = AWM(AWM.Config(), policy)
    assert [algo.ema.schedule.decay(n) for n in (1, 2, 100, 300, 5000)] == pytest.approx(
        [0.001, 0.002, 0.1, 0.3, 0.3])
    init = policy.snapshot()
    algo.begin_epoch(policy)
    for step in range(2):
        perturb_(policy, 0.1, seed=step + 5)
        algo.after_step(policy, step)
        assert algo.ema.fresh  # untouched during the epoch
    algo.end_epoch(policy, 2)
    for e, i, p in zip(algo.ema.params, init, policy.trainable_parameters()):
        torch.testing.assert_close(e, 0.002 * i + 0.998 * p.detach())
    assert not algo.ema.fresh


def test_awm_beta_zero_drops_the_lagged_copy_term_and_defaults_are_released():
    cfg = AWM.Config()
    assert (cfg.clip_range, cfg.weighting, cfg.solver, cfg.sa_tau, cfg.sa_tau_window) == (
        1.0, "ghuber", "sa_solver", 0.4, [0.3, 0.9])
    policy = make_policy()
    algo = AWM(AWM.Config(beta=0.0, beta_ema=1.0), policy)
    perturb_(policy, 0.1)
    algo.end_epoch(policy, 1)  # the copy now differs from theta: its term would be non-zero
    metrics = [o.metrics for o in algo.losses(make_batch(policy), ctx(policy))]
    assert all(m["loss/ema_velocity_mse"] == 0.0 for m in metrics)
    with_ref = AWM(AWM.Config(beta=1e-4, beta_ema=1.0), policy)
    perturb_(policy, 0.1, seed=9)
    with_ref.end_epoch(policy, 1)
    assert all(o.metrics["loss/ema_velocity_mse"] > 0 for o in with_ref.losses(make_batch(policy), ctx(policy)))


def test_awm_off_policy_rolls_out_with_and_scores_the_lagged_copy():
    policy = make_policy()
    batch = make_batch(policy)
    algo = AWM(AWM.Config(policy_mode="off_policy", beta=0.0, weighting="t", num_timesteps=1), policy)
    perturb_(policy, 0.1)
    algo.end_epoch(policy, 1)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.5)
    with torch.no_grad(), algo.rollout_policy(policy):
        v_rollout = policy.velocity(x, t)
    with torch.no_grad(), policy.use_parameters(algo.ema.params):
        v_copy = policy.velocity(x, t)
    torch.testing.assert_close(v_rollout, v_copy)
    (out,) = list(algo.losses(batch, ctx(policy, seed=4)))
    assert out.metrics["stats/ratio_mean"] != 1.0


# --------------------------------------------------------------------------- Flow-GRPO


def _sde_batch(policy, stochastic="sde", steps=10, window=None):
    return make_batch(policy, steps=steps, stochastic=stochastic, noise_level=0.7, keep_trajectory=True,
                      stochastic_steps=window)


@pytest.mark.parametrize("stochastic", ["sde", "cps"])
def test_flow_grpo_ratio_is_exactly_one_and_kl_exactly_zero_when_theta_old_ref_agree(stochastic):
    policy = make_policy()
    batch = _sde_batch(policy, stochastic)
    algo = FlowGRPO(FlowGRPO.Config(stochastic=stochastic, beta=0.04), policy)
    algo.sampler_request(0, torch.Generator().manual_seed(0))
    loss, metrics = total(algo.losses(batch, ctx(policy)))
    assert len(metrics) == 9  # int(0.99 * 10) trained steps
    for m in metrics:
        assert m["stats/ratio_mean"] == 1.0
        assert m["stats/clipfrac"] == 0.0
        assert m["loss/kl"] == 0.0
    # With r = 1 the surrogate is -A at every step.
    torch.testing.assert_close(loss, -batch.advantages.clamp(-5, 5).mean())


def test_gaussian_kl_is_torch_distributions_kl():
    g = torch.Generator().manual_seed(5)
    mu, mu_ref = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    std = 0.37
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, std), torch.distributions.Normal(mu_ref, std)
    ).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, torch.tensor(std**2)), expected)


@pytest.mark.parametrize("without_step", [False, True])
def test_flow_grpo_kl_and_ratio_after_theta_moves(without_step):
    policy = make_policy()
    batch = _sde_batch(policy)
    perturb_(policy, 0.05)
    cfg = FlowGRPO.Config(beta=0.04, clip_range=1e-4, kl_without_step_size=without_step)
    algo = FlowGRPO(cfg, policy)
    outs = list(algo.losses(batch, ctx(policy)))
    grid = [float(s) for s in batch.grid]
    for k, o in enumerate(outs):
        x, x_next = batch.trajectory[:, k], batch.trajectory[:, k + 1]
        t = torch.full((len(batch),), grid[k])
        with torch.no_grad():
            cur = sde_step(x, policy.velocity(x, t), grid[k], grid[k + 1], 0.7, s_first=grid[1],
                           x_next=x_next)
            with policy.reference():
                ref = sde_step(x, policy.velocity(x, t), grid[k], grid[k + 1], 0.7, s_first=grid[1],
                               x_next=x_next)
        sig2 = (0.7 * math.sqrt(grid[k] / (1 - (grid[k] if k else grid[1])))) ** 2
        var = sig2 if without_step else sig2 * (grid[k] - grid[k + 1])
        kl = ((cur.mean - ref.mean) ** 2).mean(1) / (2 * var)
        ratio = torch.exp(cur.log_prob - batch.log_probs[:, k])
        assert o.metrics["loss/kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
        assert o.metrics["stats/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
        assert o.metrics["loss/kl"] > 0 and o.metrics["stats/clipfrac"] > 0


def test_flow_grpo_fast_window_is_drawn_from_the_generator_and_only_it_is_trained():
    policy = make_policy()
    algo = FlowGRPO(FlowGRPO.Config(fast_window=2, fast_window_range=[0, 5], beta=0.0), policy)
    reqs = [algo.sampler_request(e, torch.Generator().manual_seed(11)) for e in range(2)]
    assert reqs[0].stochastic_steps == reqs[1].stochastic_steps  # same generator state, same window
    lo, hi = reqs[0].stochastic_steps
    assert hi - lo == 2 and 0 <= lo and hi <= 5 and reqs[0].keep_trajectory
    state = algo.state_dict()
    other = FlowGRPO(algo.cfg, policy)
    starts = [other.sampler_request(0, torch.Generator().manual_seed(s)).stochastic_steps[0] for s in range(400)]
    # As released, the whole window lies in [0, 5): starts 0..3, each equally likely.
    assert set(starts) == {0, 1, 2, 3}
    assert all(starts.count(k) / 400 == pytest.approx(0.25, abs=0.07) for k in range(4))
    other.load_state_dict(state)
    assert other.window == (lo, hi)
    batch = _sde_batch(policy, window=(lo, hi))
    assert algo.trained_steps(batch) == [lo, lo + 1]
    assert len(list(algo.losses(batch, ctx(policy)))) == 2


def test_flow_grpo_needs_a_trajectory_and_asks_to_drop_zero_std_groups():
    policy = make_policy()
    assert FlowGRPO.drop_zero_std_groups is True
    with pytest.raises(ValueError, match="trajectory"):
        list(FlowGRPO(FlowGRPO.Config(), policy).losses(make_batch(policy), ctx(policy)))


# --------------------------------------------------------------------------- DiffusionNFT


def test_nft_optimality_probability_and_schedules():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(optimality_probability(adv), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    default, ocr = EMA_SCHEDULES["default"], EMA_SCHEDULES["ocr"]
    # n = optimizer steps taken, counted from 1: the first update already uses 0.001.
    assert [default.decay(n) for n in (1, 10, 500, 900)] == pytest.approx([0.001, 0.01, 0.5, 0.5])
    assert [ocr.decay(n) for n in (1, 74, 75, 76, 175, 1000)] == pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.75, 0.999])


def test_nft_old_policy_updates_once_per_epoch_and_samples_the_rollouts():
    """As released: the old copy moves only after the epoch's optimizer steps, by
    ``old = eta old + (1 - eta) theta`` with ``eta = min(0.001 n, 0.5)``, and the next
    epoch's rollouts are sampled with it."""
    policy = make_policy()
    algo = DiffusionNFT(DiffusionNFT.Config(), policy)
    init = policy.snapshot()
    x, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    for step in range(2):  # an epoch of two optimizer steps (the OCR config's count)
        perturb_(policy, 0.1, seed=step + 3)
        algo.after_step(policy, step)
        assert algo.old.fresh and all(torch.equal(o, i) for o, i in zip(algo.old.params, init))
    algo.end_epoch(policy, 2)
    for o, i, p in zip(algo.old.params, init, policy.trainable_parameters()):
        torch.testing.assert_close(o, 0.002 * i + 0.998 * p.detach())
    with torch.no_grad(), algo.rollout_policy(policy):
        v_rollout = policy.velocity(x, t)
    with torch.no_grad(), policy.use_parameters(algo.old.params):
        v_old = policy.velocity(x, t)
    torch.testing.assert_close(v_rollout, v_old)
    # Our earlier variant stays available: per optimizer step, sampling with theta.
    ours = DiffusionNFT(DiffusionNFT.Config(old_update="step", rollout_policy="theta"), policy)
    before = policy.snapshot()
    perturb_(policy, 0.1, seed=8)
    ours.after_step(policy, 0)
    for o, b, p in zip(ours.old.params, before, policy.trainable_parameters()):
        torch.testing.assert_close(o, 0.001 * b + 0.999 * p.detach())
    with torch.no_grad():
        v_theta = policy.velocity(x, t)
        with ours.rollout_policy(policy):
            torch.testing.assert_close(policy.velocity(x, t), v_theta)
        with policy.use_parameters(ours.old.params):
            assert not torch.allclose(policy.velocity(x, t), v_theta)  # so the check above can fail


def test_nft_loss_on_policy_closed_form():
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.rand(8, generator=g)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = torch.randn(8, 3, generator=g)
    r = torch.rand(8, generator=g)
    out = nft_loss(v, v, x_t, x0, t, r, beta=0.3, ref_weight=0.0)
    # v+ = v- = v when theta = old: both terms equal the adaptive-weighted x0 error.
    err = x_t - t[:, None] * v - x0
    weighted = (err**2).mean(1) / err.abs().mean(1)
    torch.testing.assert_close(out.policy, weighted / 0.3 * 5.0)
    torch.testing.assert_close(out.positive, out.negative)


def test_nft_timesteps_are_per_sample_permutations_of_the_grid():
    policy = make_policy()
    batch = make_batch(policy, steps=10)
    algo = DiffusionNFT(DiffusionNFT.Config(), policy)
    times = algo.timesteps(batch, rows(0))
    assert times.shape == (9, len(batch))
    grid_times = set(batch.grid[:-1].float().tolist())
    for i in range(len(batch)):
        col = times[:, i].tolist()
        assert len(set(col)) == 9 and set(col) <= grid_times
    assert not torch.equal(times[:, 0], times[:, 1])
    assert algo.sampler_request(0, torch.Generator()).solver == "dpmpp_2m"


def test_nft_class_loss_matches_recomputation():
    policy = make_policy()
    batch = make_batch(policy, steps=4)
    perturb_(policy)
    algo = DiffusionNFT(DiffusionNFT.Config(beta=0.5), policy)
    loss, metrics = total(algo.losses(batch, ctx(policy, seed=7)))
    assert len(metrics) == 3
    draws = rows(7)
    times = algo.timesteps(batch, draws)
    r = optimality_probability(batch.advantages)
    expected = 0.0
    with torch.no_grad():
        for t in times:
            eps = draws.randn(2)
            x_t = (1 - t[:, None]) * batch.x0 + t[:, None] * eps
            v = policy.velocity(x_t, t)
            with policy.reference():
                v_ref = policy.velocity(x_t, t)
            out = nft_loss(v, v, x_t, batch.x0, t, r, 0.5, v_ref=v_ref, ref_weight=1e-4)
            expected = expected + out.loss.mean() / len(times)
    torch.testing.assert_close(loss.detach(), expected)


# --------------------------------------------------------------------------- EPG


def test_elbo_surrogate_averages_draw_major_stacks():
    g = torch.Generator().manual_seed(8)
    v, u = torch.randn(3 * 5, 2, generator=g), torch.randn(3 * 5, 2, generator=g)
    expected = torch.stack([-((v[k * 5:(k + 1) * 5] - u[k * 5:(k + 1) * 5]) ** 2).mean(1) for k in range(3)])
    torch.testing.assert_close(elbo_surrogate(v, u, 3), expected.mean(0))


def epg_draws(batch, seed: int, k: int):
    """EPG's ``k`` draws per sample, re-derived: draw-major stacks (draw d of sample i at d * n + i),
    each sample's draws from its own generator.  Returns ``x_t, t, x0, eps``."""
    draws = rows(seed)
    t = draws.rand(k).T.reshape(-1)
    x0 = batch.x0.repeat(k, 1)
    eps = draws.randn(k, 2).transpose(0, 1).reshape(x0.shape)
    return (1 - t[:, None]) * x0 + t[:, None] * eps, t, x0, eps


def test_epg_rho_is_one_on_policy_and_exp_elbo_difference_after_a_step():
    policy = make_policy()
    batch = make_batch(policy)
    algo = EPG(EPG.Config(num_draws=3, beta=0.1), policy)
    algo.begin_epoch(policy)
    (first,) = list(algo.losses(batch, ctx(policy, seed=9)))
    assert first.metrics["stats/rho_mean"] == 1.0
    assert first.metrics["loss/ref_elbo_gap"] == 0.0  # theta == ref
    old = policy.snapshot()
    perturb_(policy)
    algo.after_step(policy, 0)
    (out,) = list(algo.losses(batch, ctx(policy, seed=9)))
    x_t, t, x0, eps = epg_draws(batch, seed=9, k=3)
    with torch.no_grad():
        l_theta = elbo_surrogate(policy.velocity(x_t, t), eps - x0, 3)
        with policy.use_parameters(old):
            l_old = elbo_surrogate(policy.velocity(x_t, t), eps - x0, 3)
        with policy.reference():
            l_ref = elbo_surrogate(policy.velocity(x_t, t), eps - x0, 3)
    rho = torch.exp(l_theta - l_old)
    assert out.metrics["stats/rho_mean"] == pytest.approx(float(rho.mean()), rel=1e-5)
    expected = (-rho * batch.advantages * l_theta + 0.1 * (l_theta - l_ref)).mean()
    torch.testing.assert_close(out.loss.detach(), expected)


def test_epg_velocity_kl_matches_recomputation():
    policy = make_policy()
    batch = make_batch(policy)
    algo = EPG(EPG.Config(num_draws=2, kl_velocity=0.7), policy)
    algo.begin_epoch(policy)
    perturb_(policy)
    (out,) = list(algo.losses(batch, ctx(policy, seed=4)))
    x_t, t, x0, eps = epg_draws(batch, seed=4, k=2)
    with torch.no_grad():
        v = policy.velocity(x_t, t)
        with policy.reference():
            v_ref = policy.velocity(x_t, t)
    l_theta = elbo_surrogate(v, eps - x0, 2)
    gap = ((v - v_ref) ** 2).mean(1).reshape(2, -1).mean(0)
    # first update of the epoch: rho = 1; the paper's policy term plus ours
    expected = (-batch.advantages * l_theta + 0.7 * gap).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.metrics["loss/ref_velocity_gap"] == pytest.approx(float(gap.mean()), rel=1e-5)


def test_epg_velocity_kl_makes_a_negative_sample_loss_bounded():
    """One sample, one draw, ``A < 0``: the paper's loss ``A ||v - u||^2`` has no minimum in ``v``;
    with ``c ||v - v_ref||^2`` and ``A + c > 0`` its minimiser is ``(A u + c v_ref) / (A + c)``
    (closed form), where the gradient vanishes."""
    u, v_ref = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]])
    a, c = torch.tensor([-0.6]), 1.5
    v_star = ((a[:, None] * u + c * v_ref) / (a[:, None] + c)).requires_grad_(True)
    l_theta = elbo_surrogate(v_star, u, 1)
    out = epg_loss(l_theta, l_theta.detach(), a, v_gap=velocity_gap(v_star, v_ref, 1), kl_velocity=c)
    (grad,) = torch.autograd.grad(out.loss.sum(), v_star)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)
    # the paper's loss alone keeps falling along v - u
    far = (u + 10.0 * (v_star.detach() - u)).requires_grad_(True)
    paper = epg_loss(elbo_surrogate(far, u, 1), elbo_surrogate(far, u, 1).detach(), a).loss
    assert float(paper) < float(epg_loss(l_theta, l_theta.detach(), a).loss) - 1.0
    with pytest.raises(ValueError, match="v_gap"):
        epg_loss(l_theta, l_theta.detach(), a, kl_velocity=c)


def test_epg_negative_margin_stops_only_far_negative_samples():
    """Samples: (A > 0, far below ref), (A < 0, within the margin), (A < 0, beyond it).  Only the
    third loses its policy gradient; the others get the paper's ``-rho A grad l``."""
    l_theta = torch.tensor([-3.0, -1.2, -2.0], requires_grad=True)
    l_ref = torch.tensor([-1.0, -1.0, -1.0])
    adv = torch.tensor([0.5, -0.4, -0.4])
    out = epg_loss(l_theta, l_theta.detach(), adv, l_ref=l_ref, negative_margin=0.5)
    assert out.clipped.tolist() == [False, False, True]
    (grad,) = torch.autograd.grad(out.loss.sum(), l_theta)
    torch.testing.assert_close(grad, torch.tensor([-0.5, 0.4, 0.0]))
    paper = epg_loss(l_theta, l_theta.detach(), adv, l_ref=l_ref)
    torch.testing.assert_close(out.loss.detach(), paper.loss.detach())  # same value, other gradient
    with pytest.raises(ValueError, match="l_ref"):
        epg_loss(l_theta, l_theta.detach(), adv, negative_margin=0.5)


def test_epg_rho_max_truncates_the_weight_not_the_reported_ratio():
    l_theta = torch.tensor([-1.0, -1.0], requires_grad=True)
    l_old = torch.tensor([-1.0 - math.log(5.0), -1.0 - math.log(1.5)])  # rho = 5, 1.5
    adv = torch.tensor([0.3, 0.3])
    out = epg_loss(l_theta, l_old, adv, rho_max=2.0)
    torch.testing.assert_close(out.rho, torch.tensor([5.0, 1.5]))
    (grad,) = torch.autograd.grad(out.loss.sum(), l_theta)
    torch.testing.assert_close(grad, torch.tensor([-2.0 * 0.3, -1.5 * 0.3]))


# --------------------------------------------------------------------------- RAM


def test_ram_loss_value_and_class_draws():
    g = torch.Generator().manual_seed(10)
    v, v_ref, u = (torch.randn(6, 2, generator=g) for _ in range(3))
    adv = torch.randn(6, generator=g)
    out = ram_loss(v, v_ref, u, adv, eta=3.0)
    target = v_ref + 3.0 * adv[:, None] * (u - v)
    torch.testing.assert_close(out.loss, ((v - target) ** 2).mean(1))
    policy = make_policy()
    batch = make_batch(policy)
    (o,) = list(RAM(RAM.Config(eta=2.0), policy).losses(batch, ctx(policy)))
    assert o.metrics["loss/ref_velocity_mse"] == 0.0  # theta == ref
    assert o.loss.requires_grad


# --------------------------------------------------------------------------- DRaFT


def smooth_reward() -> CompositeReward:
    return CompositeReward({"toy2d_smooth": SmoothModeReward()}, {"toy2d_smooth": 1.0})


def test_draft_k_reproduces_the_euler_rollout_and_its_reward():
    policy = make_policy()
    batch = make_batch(policy, keep_trajectory=True)
    algo = DRaFT(DRaFT.Config(k=1), policy)
    req = algo.sampler_request(0, torch.Generator())
    assert req.keep_trajectory and req.solver == "euler" and DRaFT.requires_differentiable_reward
    (out,) = list(algo.losses(batch, ctx(policy, reward=smooth_reward())))
    expected = -SmoothModeReward()(batch.x0, [], []).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert out.loss.requires_grad


def _flat_grad(loss, policy):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, policy.trainable_parameters())])


@pytest.mark.parametrize("variant", ["k", "lv"])
def test_draft_checkpointing_gives_the_same_gradient(variant):
    policy = make_policy()
    batch = make_batch(policy, keep_trajectory=True)
    grads = []
    for ckpt in (False, True):
        algo = DRaFT(DRaFT.Config(variant=variant, k=3, gradient_checkpointing=ckpt), policy)
        (out,) = list(algo.losses(batch, ctx(policy, seed=2, reward=smooth_reward())))
        grads.append(_flat_grad(out.loss, policy))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_draft_k_gradient_matches_finite_differences():
    policy = make_policy()
    batch = make_batch(policy, keep_trajectory=True, steps=4)
    algo = DRaFT(DRaFT.Config(k=2), policy)
    reward = smooth_reward()
    (out,) = list(algo.losses(batch, ctx(policy, reward=reward)))
    grad = _flat_grad(out.loss, policy)
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(3))
    direction = direction / direction.norm()

    def loss_at(alpha: float) -> float:
        params = policy.trainable_parameters()
        base = policy.snapshot()
        moved, offset = [], 0
        for p in base:
            moved.append(p + alpha * direction[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        with torch.no_grad(), policy.use_parameters(moved):
            (o,) = list(algo.losses(batch, ctx(policy, reward=reward)))
        assert len(params) == len(moved)
        return float(o.loss)

    h = 1e-2
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert float(grad @ direction) == pytest.approx(fd, rel=0.05, abs=1e-4)


def test_draft_lv_averages_renoised_one_step_rewards():
    policy = make_policy()
    batch = make_batch(policy)
    algo = DRaFT(DRaFT.Config(variant="lv", lv_samples=2), policy)
    assert algo.sampler_request(0, torch.Generator()).keep_trajectory is False
    (out,) = list(algo.losses(batch, ctx(policy, seed=4, reward=smooth_reward())))
    draws = rows(4)
    s = float(batch.grid[-2])
    t = torch.full((len(batch),), s)
    scores = []
    with torch.no_grad():
        for _ in range(2):
            eps = draws.randn(2)
            x_s = (1 - s) * batch.x0 + s * eps
            scores.append(SmoothModeReward()(x_s - s * policy.velocity(x_s, t), [], []))
    torch.testing.assert_close(out.loss.detach(), -torch.stack(scores).mean())


def test_draft_refuses_a_non_differentiable_reward():
    policy = make_policy()
    batch = make_batch(policy, keep_trajectory=True)
    reward = CompositeReward({"toy2d_modes": ModeReward()}, {"toy2d_modes": 1.0})
    with pytest.raises(ValueError, match="differentiable reward"):
        list(DRaFT(DRaFT.Config(), policy).losses(batch, ctx(policy, reward=reward)))
