"""The stochastic SA-Solver for flow models (AWM's rollout sampler), checked two ways:

- step for step against diffusers' own ``SASolverScheduler(prediction_type="flow_prediction",
  use_flow_sigmas=True)`` on the same grid, noise and per-step ``tau`` (diffusers corrects the
  first step and evaluates ``tau`` at a step's start; both are arguments here);
- its marginals, for Gaussian data with the exact velocity, against the closed form
  ``N((1 - t) m, (1 - t)^2 s0^2 + t^2)`` that the ODE keeps (as ``tests/test_sde.py`` does
  for Flow-GRPO's SDE), and a version without its drift correction that does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from advantageflow.sampling import (
    SA_SOLVER_T_MAX,
    sa_predictor_step,
    sa_solver_sample,
    sa_tau_schedule,
    sample,
    time_grid,
)
from tests.test_sde import S0, M, gaussian_velocity


def _diffusers_states(grid: list[float], tau_of_t, velocity, x: torch.Tensor, seed: int):
    """Run diffusers' scheduler on ``grid`` (its last time nonzero) with its noise drawn from a
    generator seeded ``seed``; return the corrected state after each call (``last_sample``)
    and the final predicted state."""
    pytest.importorskip("diffusers")
    from diffusers import SASolverScheduler

    n = len(grid) - 1
    sched = SASolverScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, predictor_order=2,
                              corrector_order=2, lower_order_final=False, tau_func=tau_of_t)
    sched.set_timesteps(n)
    sched.sigmas = torch.tensor(grid, dtype=torch.float64)
    sched.timesteps = torch.tensor([s * 1000 for s in grid[:-1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    corrected = []
    for k in range(n):
        v = velocity(x, torch.full((x.shape[0],), grid[k], dtype=x.dtype))
        x = sched.step(v, sched.timesteps[k], x, generator=g, return_dict=False)[0]
        corrected.append(sched.last_sample.clone())
    return corrected, x


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_sa_solver_matches_diffusers_step_for_step(tau):
    grid = [float(s) for s in torch.linspace(0.98, 0.05, 9, dtype=torch.float64)]
    n = len(grid) - 1
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)  # diffusers draws one normal tensor per step, in order
    noises = torch.stack([torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(n)], dim=1)
    velocity = gaussian_velocity(M, S0)
    # diffusers evaluates tau at the step's start time (in 1000ths); same window, same rule.
    taus = [tau if 0.3 <= s <= 0.9 else 0.0 for s in grid[:-1]]
    corrected, final = _diffusers_states(grid, lambda t: tau if 300 <= float(t) <= 900 else 0.0,
                                         velocity, x0, seed=1)
    ours = sa_solver_sample(velocity, x0, grid, taus, step_noise=noises, first_corrector=True,
                            keep_trajectory=True)
    for k in range(1, n):  # diffusers' k-th call corrects the state at grid[k]
        torch.testing.assert_close(ours.trajectory[:, k], corrected[k], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.x0, final, rtol=0, atol=1e-10)
    assert tau == 0.0 or any(taus), "the window must make some steps stochastic"


def test_sa_tau_schedule_uses_the_steps_target_time():
    grid = [1.0, 0.95, 0.9, 0.6, 0.3, 0.1, 0.0]
    assert sa_tau_schedule(grid, 0.4, (0.3, 0.9)) == [0.0, 0.4, 0.4, 0.4, 0.0, 0.0]


def test_sa_solver_with_zero_tau_first_step_is_euler():
    """Order 1, tau 0: ``(s'/s) x + (1 - s')(1 - s/s' ... )``: DPM-Solver++(1) = Euler."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    s, s_next = 0.8, 0.6
    out = sa_predictor_step(x, x - s * v, s, s_next, 0.0, None)
    torch.testing.assert_close(out, x + (s_next - s) * v, rtol=0, atol=1e-14)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("shift,steps,tau,window", [
    (1.0, 40, 0.4, (0.3, 0.9)), (3.0, 40, 0.4, (0.3, 0.9)), (1.0, 100, 1.0, (0.05, 0.95)),
])
def test_sa_solver_keeps_the_odes_marginals_for_gaussian_data(shift, steps, tau, window):
    """AWM's stochasticity (tau 0.4 on [0.3, 0.9]) at 40 steps, and a much noisier one
    (tau 1 nearly everywhere, first order in the step: it needs more steps)."""
    velocity = gaussian_velocity(M, S0)
    noise = torch.randn(16000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = time_grid(steps, shift)
    ode = sample(velocity, noise, grid, solver="heun")
    sa = sample(velocity, noise, grid, solver="sa_solver", sa_tau=tau, sa_tau_window=window,
                generator=torch.Generator().manual_seed(3), keep_trajectory=True)
    for x in (ode.x0, sa.x0):
        mean, var = _moments(x)
        torch.testing.assert_close(mean, M, atol=0.04 * S0.max().item(), rtol=0)
        torch.testing.assert_close(var, S0**2, rtol=0.08, atol=0)
    torch.testing.assert_close(_moments(sa.x0)[1], _moments(ode.x0)[1], rtol=0.1, atol=0)
    # The stochastic path really is stochastic: it is not the ODE's map of the same noise.
    assert (sa.x0 - ode.x0).abs().mean() > 0.05
    for frac in (0.25, 0.5, 0.75):
        k = int(frac * steps)
        s = float(grid[k])
        mean, var = _moments(sa.trajectory[:, k])
        torch.testing.assert_close(mean, (1 - s) * M, atol=0.05, rtol=0)
        torch.testing.assert_close(var, (1 - s) ** 2 * S0**2 + s**2, rtol=0.08, atol=0)


def test_sa_solver_without_its_drift_correction_would_not_keep_the_marginals():
    """The check above can fail: the same noise without the ``e^{-tau^2 h}`` contraction
    (an ODE step plus noise) inflates the variance far beyond the tolerance."""
    velocity = gaussian_velocity(M, S0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16000, 2, generator=g, dtype=torch.float64)
    grid = [float(s) for s in time_grid(40)]
    grid[0] = SA_SOLVER_T_MAX
    for k in range(40):
        s, s_next = grid[k], grid[k + 1]
        if s_next <= 0:
            break
        d = x - s * velocity(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        h = math.log((1 - s_next) / s_next) - math.log((1 - s) / s)
        ode = sa_predictor_step(x, d, s, s_next, 0.0, None)
        x = ode + s_next * math.sqrt(-math.expm1(-2 * h)) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert (x.var(0) / S0**2 > 1.5).all()


def test_sa_solver_released_conventions_start_first_step_and_last_step():
    """AWM's released sampler: it starts at ``1 - 1e-3`` (log-SNR is infinite at 1), skips the
    corrector on the first step, and its step to ``t = 0`` returns the last data prediction."""
    velocity = gaussian_velocity(M, S0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64)
    z = torch.randn(32, 3, 2, generator=g, dtype=torch.float64)

    def data_prediction(x_, s_):
        return x_ - s_ * velocity(x_, torch.full((x_.shape[0],), s_, dtype=x_.dtype))

    one = sa_solver_sample(velocity, x, [1.0, 0.0], [0.0])
    torch.testing.assert_close(one.x0, data_prediction(x, SA_SOLVER_T_MAX), rtol=0, atol=1e-14)
    grid, taus = [1.0, 0.7, 0.4, 0.0], [0.4, 0.4, 0.0]
    out = sa_solver_sample(velocity, x, grid, taus, step_noise=z, keep_trajectory=True)
    x1 = sa_predictor_step(x, data_prediction(x, SA_SOLVER_T_MAX), SA_SOLVER_T_MAX, 0.7, 0.4, z[:, 0])
    torch.testing.assert_close(out.trajectory[:, 1], x1, rtol=0, atol=1e-14)  # no first correction
    corrected = sa_solver_sample(velocity, x, grid, taus, step_noise=z, keep_trajectory=True, first_corrector=True)
    assert not torch.allclose(corrected.trajectory[:, 1], x1)
    x2 = sa_predictor_step(x1, data_prediction(x1, 0.7), 0.7, 0.4, 0.4, z[:, 1],
                           data_prediction(x, SA_SOLVER_T_MAX), SA_SOLVER_T_MAX)
    torch.testing.assert_close(out.x0, data_prediction(x2, 0.4), rtol=0, atol=1e-14)
