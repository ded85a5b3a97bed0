"""AdvantageFlow's loss: minimiser, convexity, gradient, and the passes it skips."""

from __future__ import annotations

import torch

from advantageflow.algorithms.advantageflow import AdvantageFlow, advantageflow_loss, per_sample_minimiser
from advantageflow.algorithms.base import TrainContext
from advantageflow.sampling import time_grid
from advantageflow.types import Rollout
from tests.policies import PerSamplePolicy, minimise_losses


def _rollout(batch: int, dim: int, adv: torch.Tensor, seed: int = 1) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return Rollout(
        x0=x0, noise=torch.zeros_like(x0), cond=torch.arange(batch), prompts=[""] * batch,
        group_ids=torch.zeros(batch, dtype=torch.long), grid=time_grid(10), metadata=[{}] * batch,
        advantages=adv,
    )


def test_pure_loss_minimiser_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    b, d = 6, 5
    x0, f_old, f_ref = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(3))
    adv = torch.tensor([-1.0, -0.5, 0.0, 0.3, 0.9, 1.0], dtype=torch.float64)
    gamma, lam = 1.1, 0.2
    f = torch.zeros(b, d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([f], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = advantageflow_loss(f, x0, f_old, f_ref, adv, gamma, lam)[0].sum()
        loss.backward()
        return loss

    opt.step(closure)
    expected = per_sample_minimiser(x0, f_old, f_ref, adv, gamma, lam)
    assert torch.allclose(f.detach(), expected, atol=1e-6)


def test_gradient_matches_independent_derivation():
    gen = torch.Generator().manual_seed(3)
    b, d = 4, 7
    f = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    x0, f_old, f_ref = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(3))
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    loss = advantageflow_loss(f, x0, f_old, f_ref, adv, 1.3, 0.1)[0].sum()
    (grad,) = torch.autograd.grad(loss, f)
    a = adv[:, None]
    expected = 2.0 / d * (a * (f - x0) + 1.3 * (f - f_old) + 0.1 * (f - f_ref))
    assert torch.allclose(grad, expected)


def test_convex_iff_total_weight_positive():
    gen = torch.Generator().manual_seed(5)
    x0, f_old, f_ref, f, direction = (torch.randn(1, 3, generator=gen, dtype=torch.float64) for _ in range(5))

    def second_difference(adv: float, gamma: float, lam: float) -> float:
        a = torch.tensor([adv], dtype=torch.float64)

        def value(z: float) -> float:
            return float(advantageflow_loss(f + z * direction, x0, f_old, f_ref, a, gamma, lam)[0])

        return value(1.0) - 2 * value(0.0) + value(-1.0)

    assert second_difference(-1.0, 1.1, 1e-3) > 0  # A + gamma + lambda > 0: convex
    assert second_difference(1.0, 0.0, 0.0) > 0
    assert second_difference(-1.0, 0.5, 0.0) < 0  # negative total weight: concave
    assert abs(second_difference(-1.0, 1.0, 0.0)) < 1e-12  # zero: flat


def test_training_a_linear_model_reaches_the_per_sample_minimiser():
    """Through the algorithm class: old = a stored snapshot, ref = the policy's reference."""
    b, d = 5, 3
    policy = PerSamplePolicy(b, d)
    adv_raw = torch.tensor([-5.0, -2.5, 0.0, 2.5, 5.0], dtype=torch.float64)  # scaled to [-1, 1]
    batch = _rollout(b, d, adv_raw)
    cfg = AdvantageFlow.Config(gamma=1.5, lambda_ref=0.3, adaptive_weight=False, t_min=0.2, t_max=0.9)
    algo = AdvantageFlow(cfg, policy)
    algo.begin_epoch(policy)
    p_old = policy.param.detach().clone()
    algo.old.fresh = False  # force the explicit old pass so f_old is the snapshot's prediction
    minimise_losses(algo, batch, policy, max_iter=300)
    x_t, t = policy.last_inputs
    tt = t[:, None]
    a = (adv_raw / 5.0)[:, None]
    # f = x_t - t P; the minimiser in f maps back to P* = (A u + g P_old + l P_ref) / (A + g + l).
    u = (x_t - batch.x0) / tt
    expected = (a * u + cfg.gamma * p_old + cfg.lambda_ref * policy.ref_param) / (a + cfg.gamma + cfg.lambda_ref)
    assert torch.allclose(policy.param.detach(), expected, atol=1e-6)


def test_skips_old_pass_when_fresh_and_ref_pass_when_lambda_zero():
    b, d = 4, 2
    batch = _rollout(b, d, torch.ones(b, dtype=torch.float64))

    def calls(lambda_ref: float, fresh: bool) -> int:
        policy = PerSamplePolicy(b, d)
        algo = AdvantageFlow(AdvantageFlow.Config(lambda_ref=lambda_ref, draws_per_sample=2), policy)
        algo.begin_epoch(policy)
        algo.old.fresh = fresh
        ctx = TrainContext(policy=policy, generator=torch.Generator().manual_seed(0), step=0)
        for term in algo.losses(batch, ctx):
            term.loss.backward()
        return policy.calls

    assert calls(0.0, True) == 2  # one pass per draw
    assert calls(1e-3, True) == 4  # + reference
    assert calls(1e-3, False) == 6  # + old


def test_old_policy_is_frozen_at_epoch_start_and_fresh_flag_tracks_steps():
    policy = PerSamplePolicy(3, 2)
    algo = AdvantageFlow(AdvantageFlow.Config(), policy)
    algo.begin_epoch(policy)
    assert algo.old.fresh
    with torch.no_grad():
        policy.param.add_(1.0)
    algo.after_step(policy, 0)
    assert not algo.old.fresh
    assert torch.allclose(algo.old.params[0] + 1.0, policy.param.detach())
    with algo.old.active(policy):
        assert torch.allclose(policy.param, algo.old.params[0])
    assert torch.allclose(algo.old.params[0] + 1.0, policy.param.detach())  # restored


def test_ema_old_policy_schedule():
    policy = PerSamplePolicy(2, 2)
    cfg = AdvantageFlow.Config(old_policy="ema", ema_rate=0.25, ema_max_decay=0.5)
    algo = AdvantageFlow(cfg, policy)
    start = policy.param.detach().clone()
    with torch.no_grad():
        policy.param.add_(2.0)
    algo.after_step(policy, 0)  # decay 0: old = theta
    assert algo.old.fresh and torch.allclose(algo.old.params[0], policy.param.detach())
    with torch.no_grad():
        policy.param.add_(4.0)
    algo.after_step(policy, 1)  # decay 0.25
    assert not algo.old.fresh
    assert torch.allclose(algo.old.params[0], 0.25 * (start + 2.0) + 0.75 * (start + 6.0))


def test_stratified_times_put_one_draw_in_each_stratum_and_keep_the_distribution():
    from advantageflow.algorithms.common import sample_times
    from advantageflow.seeding import RowRandom

    k_total = 4
    for kind in ("uniform", "logit_normal"):
        rows = RowRandom([(7, i) for i in range(4000)])
        draws = torch.stack([sample_times(rows, kind=kind, stratum=(k, k_total)) for k in range(k_total)], 1)
        if kind == "uniform":
            lo = torch.arange(k_total) / k_total
            assert bool(((draws >= lo) & (draws < lo + 1 / k_total)).all())  # draw k in [k/K, (k+1)/K)
            quantiles = torch.tensor([0.25, 0.5, 0.75])
        else:  # equal-probability strata of the logit-normal: edges sigmoid(ndtri(k / K))
            edges = torch.sigmoid(torch.special.ndtri(torch.tensor([0.25, 0.5, 0.75])))
            assert bool((draws[:, :-1] < edges).all()) and bool((draws[:, 1:] >= edges).all())
            quantiles = edges
        # pooled over strata, the times follow the unstratified law (its quartiles)
        pooled = draws.flatten()
        for q, x in zip((0.25, 0.5, 0.75), quantiles):
            assert abs(float((pooled < x).double().mean()) - q) < 0.01
    try:
        sample_times(RowRandom([0]), stratum=(4, 4))
    except ValueError as err:
        assert "stratum 4 of 4" in str(err)
    else:
        raise AssertionError("a stratum outside 0..K-1 must be refused")


def test_advantageflow_stratified_draws_cover_the_time_range_per_sample():
    b, d, k_total = 64, 2, 3
    batch = _rollout(b, d, torch.ones(b, dtype=torch.float64))
    seen = []

    class Recording(PerSamplePolicy):
        def velocity(self, x_t, t, cond):
            seen.append(t.detach().clone())
            return super().velocity(x_t, t, cond)

    policy = Recording(b, d)
    cfg = AdvantageFlow.Config(lambda_ref=0.0, draws_per_sample=k_total, stratified_times=True)
    algo = AdvantageFlow(cfg, policy)
    algo.begin_epoch(policy)
    ctx = TrainContext(policy=policy, generator=torch.Generator().manual_seed(0), step=0)
    for term in algo.losses(batch, ctx):
        term.loss.backward()
    times = torch.stack(seen, 1)  # (B, K): one theta pass per draw
    stratum = torch.floor(times * k_total)
    assert torch.equal(stratum, torch.arange(k_total, dtype=times.dtype).expand(b, k_total))
