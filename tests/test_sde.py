"""The stochastic sampler steps Flow-GRPO trains through, against closed forms.

Gaussian data ``x0 ~ N(m, s0^2)`` (per dimension) has an analytic velocity: with
``x_t = (1 - t) x0 + t eps``, ``a = 1 - t``, ``V = a^2 s0^2 + t^2`` (the variance of ``x_t``),
``E[eps | x_t] = t (x_t - a m) / V`` and ``E[x0 | x_t] = m + a s0^2 (x_t - a m) / V``, so::

    v(x, t) = E[eps - x0 | x_t = x] = (t - a s0^2) (x - a m) / V - m.
"""

from __future__ import annotations

import math

import pytest
import torch

from advantageflow.sampling import cps_step, euler_step, sample, sde_sigma, sde_step, time_grid

M = torch.tensor([1.0, -0.5], dtype=torch.float64)
S0 = torch.tensor([0.5, 2.0], dtype=torch.float64)


def gaussian_velocity(m: torch.Tensor, s0: torch.Tensor):
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)[:, None]
        a = 1.0 - t
        var = a**2 * s0**2 + t**2
        return (t - a * s0**2) * (x - a * m) / var - m

    return velocity


STEPS = [(1.0, 0.9), (0.9, 0.75), (0.5, 0.4), (0.1, 0.0)]


@pytest.mark.parametrize("s,s_next", STEPS)
def test_sde_with_zero_noise_is_exactly_euler(s, s_next):
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(16, 3, 4, generator=g) for _ in range(3))
    out = sde_step(x, v, s, s_next, 0.0, s_first=0.9, noise=z)
    euler = euler_step(x, v, s, s_next)
    assert torch.equal(out.x_next, euler)
    assert torch.equal(out.mean, euler)
    assert float(out.std) == 0.0


@pytest.mark.parametrize("s,s_next", STEPS)
def test_cps_with_zero_noise_is_euler(s, s_next):
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(16, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = cps_step(x, v, s, s_next, 0.0, noise=z)
    # (1 - s')(x - s v) + s'(x + (1 - s) v) = x + (s' - s) v: equal up to float64 rounding.
    torch.testing.assert_close(out.x_next, euler_step(x, v, s, s_next), rtol=0, atol=1e-14)
    assert float(out.std) == 0.0


@pytest.mark.parametrize("s,s_next", STEPS[:3])
def test_sde_log_prob_is_normal_log_density_averaged_over_dims(s, s_next):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 4, generator=g)
    out = sde_step(x, v, s, s_next, 0.7, s_first=0.9, generator=g)
    # Independent: sig from the formula, N(mu, sig^2 (-D)) from torch.distributions.
    denom = 1.0 - s if s < 1.0 else 1.0 - 0.9
    sig = 0.7 * math.sqrt(s / denom)
    assert float(out.std) == pytest.approx(sig * math.sqrt(s - s_next), rel=1e-6)
    expected = torch.distributions.Normal(out.mean, sig * math.sqrt(s - s_next)).log_prob(out.x_next)
    torch.testing.assert_close(out.log_prob, expected.mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    # Scoring a stored transition gives the same number.
    rescored = sde_step(x, v, s, s_next, 0.7, s_first=0.9, x_next=out.x_next)
    torch.testing.assert_close(rescored.log_prob, out.log_prob, rtol=0, atol=0)


def test_cps_log_prob_is_negative_squared_error():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    out = cps_step(x, v, 0.6, 0.5, 0.7, generator=g)
    assert float(out.std) == pytest.approx(0.5 * math.sin(0.7 * math.pi / 2), rel=1e-6)
    torch.testing.assert_close(out.log_prob, -((out.x_next - out.mean) ** 2).mean(dim=1))


def test_sde_step_draws_have_the_stated_moments():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, generator=g, dtype=torch.float64).expand(16000, 2)
    v = torch.randn(1, 2, generator=g, dtype=torch.float64).expand(16000, 2)
    s, s_next, a = 0.6, 0.5, 0.7
    out = sde_step(x, v, s, s_next, a, generator=g)
    sig = sde_sigma(s, a)
    d = s_next - s
    mu = x[0] * (1 + sig**2 * d / (2 * s)) + v[0] * (1 + sig**2 * (1 - s) / (2 * s)) * d
    torch.testing.assert_close(out.x_next.mean(0), mu, atol=0.01, rtol=0)
    torch.testing.assert_close(out.x_next.std(0), torch.full((2,), sig * math.sqrt(-d), dtype=torch.float64),
                               atol=0.005, rtol=0)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_rollouts_keep_the_odes_marginals_for_gaussian_data(shift):
    velocity = gaussian_velocity(M, S0)
    # 16000 x 2 stays under torch's intra-op grain size: single-threaded, fast on a busy machine.
    noise = torch.randn(16000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grid = time_grid(100, shift)
    ode = sample(velocity, noise, grid, solver="heun")
    sde = sample(velocity, noise, grid, stochastic="sde", noise_level=0.7,
                 generator=torch.Generator().manual_seed(6), keep_trajectory=True)
    target_var = S0**2
    for x in (ode.x0, sde.x0):
        mean, var = _moments(x)
        torch.testing.assert_close(mean, M, atol=0.04 * S0.max().item(), rtol=0)
        torch.testing.assert_close(var, target_var, rtol=0.08, atol=0)
    # The SDE and the ODE agree with each other, not only with the target.
    torch.testing.assert_close(_moments(sde.x0)[1], _moments(ode.x0)[1], rtol=0.1, atol=0)
    # Intermediate marginals N((1 - s) m, (1 - s)^2 s0^2 + s^2) along the SDE trajectory.
    for k in (30, 60, 90):
        s = float(grid[k])
        mean, var = _moments(sde.trajectory[:, k])
        torch.testing.assert_close(mean, (1 - s) * M, atol=0.05, rtol=0)
        torch.testing.assert_close(var, (1 - s) ** 2 * S0**2 + s**2, rtol=0.08, atol=0)


def test_sde_without_its_drift_correction_would_not_keep_the_marginals():
    """The check above can fail: Euler plus the same noise (no sig^2 drift term) inflates
    the variance far beyond the tolerance."""
    velocity = gaussian_velocity(M, S0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16000, 2, generator=g, dtype=torch.float64)
    grid = [float(s) for s in time_grid(100)]
    for k in range(100):
        s, s_next = grid[k], grid[k + 1]
        t = torch.full((x.shape[0],), s, dtype=x.dtype)
        std = sde_sigma(s, 0.7, grid[1]) * math.sqrt(s - s_next)
        x = euler_step(x, velocity(x, t), s, s_next) + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert (x.var(0) / S0**2 > 1.5).all()


def test_cps_rollouts_keep_point_mass_marginals_exactly():
    """CPS keeps the noise coefficient: with an exact denoiser (point-mass data, where the
    posterior is exact) every intermediate marginal is N((1 - s) m, s^2), at any step size."""
    m = torch.tensor([1.5, -2.0], dtype=torch.float64)

    def velocity(x, t):  # x0 = m surely: v = (x - m) / t
        return (x - m) / t.to(x.dtype)[:, None]

    noise = torch.randn(16000, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grid = time_grid(6, 3.0)
    out = sample(velocity, noise, grid, stochastic="cps", noise_level=0.7, stochastic_steps=(0, 5),
                 generator=torch.Generator().manual_seed(9), keep_trajectory=True)
    for k in range(1, 6):
        s = float(grid[k])
        mean, var = _moments(out.trajectory[:, k])
        torch.testing.assert_close(mean, (1 - s) * m, atol=0.02, rtol=0)
        torch.testing.assert_close(var, torch.full((2,), s**2, dtype=torch.float64), rtol=0.05, atol=0)


def test_cps_step_moments_for_gaussian_data_match_the_closed_form():
    """One CPS step from the exact marginal at ``s``.  With slopes ``alpha = a s0^2 / V`` of
    ``x0_hat`` and ``beta = t / V`` of ``x1_hat`` in ``x - a m``, and ``c' = sqrt(s'^2 - sig^2)``:
    ``E x' = (1 - s') m + k (E x - a m)`` and ``Var x' = k^2 V + sig^2`` with
    ``k = (1 - s') alpha + c' beta``.  (Unlike the ``sde`` form, this is below the marginal
    variance for non-degenerate data: CPS preserves coefficients, not Gaussian marginals.)"""
    s, s_next, level = 0.6, 0.45, 0.7
    a = 1 - s
    var_s = a**2 * S0**2 + s**2
    g = torch.Generator().manual_seed(10)
    x = a * M + var_s.sqrt() * torch.randn(16000, 2, generator=g, dtype=torch.float64)
    v = gaussian_velocity(M, S0)(x, torch.full((x.shape[0],), s, dtype=torch.float64))
    out = cps_step(x, v, s, s_next, level, generator=g)
    sig = s_next * math.sin(level * math.pi / 2)
    k = (1 - s_next) * a * S0**2 / var_s + math.sqrt(s_next**2 - sig**2) * s / var_s
    mean, var = _moments(out.x_next)
    torch.testing.assert_close(mean, (1 - s_next) * M, atol=0.04, rtol=0)
    torch.testing.assert_close(var, k**2 * var_s + sig**2, rtol=0.04, atol=0)
    # ... and measurably below the true marginal variance (a^2 s0^2 + t^2 at s') on the wide axis.
    marginal = (1 - s_next) ** 2 * S0**2 + s_next**2
    assert var[1] < 0.9 * marginal[1]


def _cps_one_step_deficit(s: float, s_next: float, level: float, s0: float) -> tuple[float, float]:
    """``(V' - Var x', short form)`` for one CPS step from the exact marginal at ``s`` of
    ``N(m, s0^2)`` data (the closed form the test above checks by sampling)."""
    a = 1 - s
    var_s = a**2 * s0**2 + s**2
    sig = s_next * math.sin(level * math.pi / 2)
    k = ((1 - s_next) * a * s0**2 + math.sqrt(s_next**2 - sig**2) * s) / var_s
    marginal = (1 - s_next) ** 2 * s0**2 + s_next**2
    p, q, c = a**2 * s0**2, s**2, math.cos(level * math.pi / 2)
    return marginal - (k**2 * var_s + sig**2), p * q * (1 - c) ** 2 / var_s


def test_cps_variance_deficit_short_form_holds_only_for_a_vanishing_step():
    """``P Q (1 - cos(a pi/2))^2 / V`` is the deficit of a zero-length step, not of a real one."""
    for s0 in (0.5, 2.0):
        exact, short = _cps_one_step_deficit(0.6, 0.6, 0.7, s0)
        assert exact == pytest.approx(short, rel=1e-12)
        exact, short = _cps_one_step_deficit(0.6, 0.6 - 1e-6, 0.7, s0)
        assert exact == pytest.approx(short, rel=1e-4)
        exact, short = _cps_one_step_deficit(0.6, 0.45, 0.7, s0)
        assert exact > 3 * short  # the doc's figures: 0.0385 vs 0.0107 (s0 0.5), 0.2466 vs 0.0687 (s0 2)
        print(f"s0 {s0}: exact deficit {exact:.4f}, short form {short:.4f}")
