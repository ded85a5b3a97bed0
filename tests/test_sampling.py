"""ODE samplers against closed forms (Gaussian data has an analytic velocity field)."""

from __future__ import annotations

import pytest
import torch

from advantageflow.sampling import (
    dpmpp_2m_step,
    euler_step,
    sample,
    shift_time,
    time_grid,
)
from tests.analytic import GaussianFlow


def test_time_grid_is_decreasing_from_one_to_zero():
    for shift in (1.0, 3.0):
        g = time_grid(10, shift)
        assert g.shape == (11,)
        assert g[0] == 1.0 and g[-1] == 0.0
        assert bool((g[1:] < g[:-1]).all())


def test_shifted_grid_matches_formula():
    s = torch.linspace(1, 0, 11, dtype=torch.float64)
    expected = 3 * s / (1 + 2 * s)
    assert torch.allclose(time_grid(10, 3.0), expected)
    assert torch.allclose(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))


@pytest.mark.parametrize("solver,steps,tol", [("euler", 200, 0.02), ("heun", 20, 0.01), ("dpmpp_2m", 40, 0.02)])
@pytest.mark.parametrize("mu,s0", [(2.0, 0.5), (-1.0, 1.5)])
def test_ode_samplers_land_on_data_distribution(solver, steps, tol, mu, s0):
    flow = GaussianFlow(mu, s0)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(40000, 1, generator=gen, dtype=torch.float64)
    out = sample(flow.velocity, noise, time_grid(steps), solver=solver)
    assert abs(float(out.x0.mean()) - mu) < tol + 0.02
    assert abs(float(out.x0.std()) - s0) < tol + 0.02


def test_exact_flow_map_is_followed_by_heun():
    """The ODE of Gaussian data is linear: x_t = (1-t) mu + sqrt(var_t) * z along a path."""
    flow = GaussianFlow(1.0, 0.3)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    out = sample(flow.velocity, z.clone(), time_grid(200), solver="heun")
    assert torch.allclose(out.x0, 1.0 + 0.3 * z, atol=1e-4)


def test_dpmpp_first_order_step_is_euler():
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    for s, s_next in [(1.0, 0.8), (0.6, 0.3), (0.2, 0.0)]:
        x0_pred = x - s * v
        assert torch.allclose(dpmpp_2m_step(x, x0_pred, s, s_next), euler_step(x, v, s, s_next))


def test_dpmpp_second_order_beats_euler_on_few_steps():
    flow = GaussianFlow(1.5, 0.4)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    exact = 1.5 + 0.4 * z
    err = {s: float((sample(flow.velocity, z.clone(), time_grid(8), solver=s).x0 - exact).abs().max())
           for s in ("euler", "dpmpp_2m")}
    assert err["dpmpp_2m"] < 0.5 * err["euler"]


def test_trajectory_only_when_asked():
    flow = GaussianFlow(0.0, 1.0)
    noise = torch.randn(4, 2)
    assert sample(flow.velocity, noise, time_grid(5)).trajectory is None
    out = sample(flow.velocity, noise, time_grid(5), keep_trajectory=True)
    assert out.trajectory.shape == (4, 6, 2)
    assert torch.equal(out.trajectory[:, 0], noise) and torch.equal(out.trajectory[:, -1], out.x0)
    assert out.log_probs is None
