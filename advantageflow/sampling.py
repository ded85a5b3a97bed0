"""Time grids, ODE and SDE steps as pure functions, and one ``sample()``.

Convention (see :mod:`advantageflow.types`): ``t = 1`` is noise, ``t = 0`` is data; a step
goes from grid value ``s`` to ``s_next < s`` with ``D = s_next - s < 0``.  Every step function
takes states ``x`` of shape ``(B, *S)`` and returns the same shape; ``s`` and ``s_next`` are
Python floats or 0-d tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from advantageflow.types import mean_flat

VelocityFn = Callable[[Tensor, float], Tensor]
"""``velocity_fn(x, s) -> v``: the policy at states ``x`` ``(B, *S)`` and scalar time ``s``."""


# --------------------------------------------------------------------------- time grids


def shift_time(s: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift ``s' = shift * s / (1 + (shift - 1) * s)`` (identity at 1)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass
class SamplerRequest:
    """What an algorithm needs from the rollout sampler.

    Attributes:
        solver: ODE solver override for deterministic steps (``None``: ``sampler.solver``).
        stochastic: ``"sde"`` / ``"cps"`` for Flow-GRPO's stochastic steps with log-probs.
        noise_level: the SDE noise level ``a``.
        stochastic_steps: ``[start, end)`` indices of stochastic steps (``None``: all).
        keep_trajectory: keep every state of the sampler in ``Rollout.trajectory``.
        sa_tau, sa_tau_window: the ``sa_solver`` solver's stochasticity and the target
            times it applies to (AWM's released values; ``sa_tau = 0`` is an ODE solver).
    """

    solver: str | None = None
    stochastic: Literal["none", "sde", "cps"] = "none"
    noise_level: float = 0.7
    stochastic_steps: tuple[int, int] | None = None
    keep_trajectory: bool = False
    sa_tau: float = 0.4
    sa_tau_window: tuple[float, float] = (0.3, 0.9)



def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """Decreasing grid ``(steps + 1,)`` from 1 to 0, uniform then shifted (float64)."""
    if steps < 1:
        raise ValueError("a time grid needs at least one step")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(grid, shift) if shift != 1.0 else grid


# --------------------------------------------------------------------------- ODE steps


def euler_step(x: Tensor, v: Tensor, s: float, s_next: float) -> Tensor:
    """Euler: ``x + (s_next - s) * v``."""
    return x + (s_next - s) * v


def heun_step(x: Tensor, v: Tensor, s: float, s_next: float, velocity_fn: VelocityFn) -> Tensor:
    """Heun's second-order step (trapezoid on the velocity; one extra evaluation)."""
    x_euler = euler_step(x, v, s, s_next)
    v_next = velocity_fn(x_euler, s_next)
    return x + (s_next - s) * 0.5 * (v + v_next)


def _log_snr(s: float) -> float:
    """``lambda(s) = log(alpha / sigma)`` with ``alpha = 1 - s``, ``sigma = s``."""
    if s <= 0.0:
        return math.inf
    if s >= 1.0:
        return -math.inf
    return math.log((1.0 - s) / s)


def dpmpp_2m_step(
    x: Tensor,
    x0_pred: Tensor,
    s: float,
    s_next: float,
    x0_prev: Tensor | None = None,
    s_prev: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M) in data-prediction form for rectified flow.

    With ``alpha = 1 - s``, ``sigma = s``, ``h = lambda(s_next) - lambda(s)`` (Lu et al. 2022,
    DPM-Solver++ Alg. 2):  ``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D`` where
    ``D = x0_pred`` (first order) or ``(1 + 1/(2r)) x0_pred - 1/(2r) x0_prev`` with
    ``r = h_prev / h``.  ``alpha' (1 - e^{-h}) = (1 - s') - (1 - s) s' / s`` stays finite at
    ``s = 1``; the first-order step is exactly Euler.  Falls back to first order where the
    previous prediction is missing or a log-SNR is infinite (first and last steps).

    Args:
        x: ``(B, *S)`` state at ``s``.  x0_pred: ``(B, *S)`` ``x - s * v``.
        x0_prev, s_prev: the previous step's prediction and time, or ``None``.
    """
    coef_x = s_next / s
    coef_d = (1.0 - s_next) - (1.0 - s) * s_next / s
    lam, lam_next = _log_snr(s), _log_snr(s_next)
    second_order = (
        x0_prev is not None
        and s_prev is not None
        and all(math.isfinite(v) for v in (lam, lam_next, _log_snr(s_prev)))
    )
    if second_order:
        r = (lam - _log_snr(s_prev)) / (lam_next - lam)
        d = (1.0 + 0.5 / r) * x0_pred - (0.5 / r) * x0_prev
    else:
        d = x0_pred
    return coef_x * x + coef_d * d


# --------------------------------------------------------------------------- SDE steps


@dataclass
class SDEStep:
    """One stochastic step (Flow-GRPO, arXiv 2505.05470, Eq. 9 / its CPS variant).

    Attributes:
        x_next: ``(B, *S)`` the sample at ``s_next``.
        mean: ``(B, *S)`` the Gaussian mean of ``x_next`` given ``x``.
        std: 0-d tensor, the Gaussian standard deviation.
        log_prob: ``(B,)`` log-density of ``x_next`` averaged over non-batch dimensions
            (CPS: ``-(x_next - mean)^2`` averaged, constants dropped).
    """

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def sde_sigma(s: float, noise_level: float, s_first: float | None = None) -> float:
    """``a * sqrt(s / (1 - s))``, using ``1 - s_first`` as the denominator at ``s = 1``."""
    denom = 1.0 - s if s < 1.0 else 1.0 - (s_first if s_first is not None else 0.0)
    return noise_level * math.sqrt(s / max(denom, 1e-12))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample Gaussian log-density averaged over dimensions, in float32: ``(B,)``."""
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return mean_flat(log_density)


def sde_step(
    x: Tensor,
    v: Tensor,
    s: float,
    s_next: float,
    noise_level: float,
    *,
    s_first: float | None = None,
    noise: Tensor | None = None,
    x_next: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Flow-GRPO's marginal-preserving SDE step; ``noise_level = 0`` is exactly Euler.

    ``sig = a sqrt(s / (1 - s))``, ``mu = x (1 + sig^2 D / (2 s)) + v (1 + sig^2 (1 - s)/(2 s)) D``,
    ``x' = mu + sig sqrt(-D) z``.  Give ``x_next`` to score a stored sample (training);
    otherwise ``noise`` (or fresh draws from ``generator``) makes a new one.
    """
    d = s_next - s
    sig = sde_sigma(s, noise_level, s_first)
    mean = x * (1.0 + sig**2 * d / (2.0 * s)) + v * (1.0 + sig**2 * (1.0 - s) / (2.0 * s)) * d
    std = torch.tensor(sig * math.sqrt(-d), dtype=torch.float32, device=x.device)
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean + std.to(x.dtype) * noise
    if noise_level == 0.0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    else:
        log_prob = gaussian_log_prob(x_next, mean, std)
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


def cps_step(
    x: Tensor,
    v: Tensor,
    s: float,
    s_next: float,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    x_next: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Coefficient-preserving sampling step (Flow-CPS); ``noise_level = 0`` is exactly Euler.

    ``sig = s' sin(a pi / 2)``, ``mu = (1 - s') (x - s v) + sqrt(s'^2 - sig^2) (x + (1 - s) v)``,
    ``x' = mu + sig z``; the log-prob drops constants: ``-(x' - mu)^2`` averaged.
    """
    sig = s_next * math.sin(noise_level * math.pi / 2.0)
    x0_hat = x - s * v
    x1_hat = x + (1.0 - s) * v
    mean = (1.0 - s_next) * x0_hat + math.sqrt(max(s_next**2 - sig**2, 0.0)) * x1_hat
    std = torch.tensor(sig, dtype=torch.float32, device=x.device)
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean + sig * noise
    log_prob = -mean_flat((x_next.float() - mean.float()) ** 2)
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


# --------------------------------------------------------------------------- SA-Solver

SA_SOLVER_T_MAX = 1.0 - 1e-3
"""SA-Solver works in log-SNR, infinite at ``t = 1``: a grid starting at 1 starts here instead
(AWM's released sampler does the same)."""


def sa_tau_schedule(grid: list[float], tau: float, window: tuple[float, float]) -> list[float]:
    """Per-step stochasticity ``tau_k`` for step ``k`` (``s_k -> s_{k+1}``): ``tau`` when the
    step's target time ``s_{k+1}`` lies in ``window`` (inclusive), else 0 (AWM's released
    choice: ``tau = 0.4`` for ``t`` in ``[0.3, 0.9]``)."""
    lo, hi = window
    return [tau if lo <= s_next <= hi else 0.0 for s_next in grid[1:]]


def _sa_base(x: Tensor, d: Tensor, s: float, s_next: float, tau: float, noise: Tensor | None) -> tuple[Tensor, float]:
    """The order-1 part of an SA-Solver step for ``alpha = 1 - t``, ``sigma = t`` (data
    prediction ``d``), and the step's log-SNR increment ``h``::

        x' = e^{-tau^2 h} (s'/s) x + (1 - s') (1 - e^{-(1 + tau^2) h}) d + s' sqrt(1 - e^{-2 tau^2 h}) z

    (Xue et al. 2023, SA-Solver, arXiv 2309.05019, Eq. 15 with one interpolation point).
    ``tau = 0`` is DPM-Solver++(1), i.e. Euler.
    """
    h = _log_snr(s_next) - _log_snr(s)
    t2 = tau * tau
    out = math.exp(-t2 * h) * (s_next / s) * x + (1.0 - s_next) * (-math.expm1(-(1.0 + t2) * h)) * d
    if t2 > 0.0 and noise is not None:
        out = out + s_next * math.sqrt(-math.expm1(-2.0 * t2 * h)) * noise
    return out, h


def sa_predictor_step(
    x: Tensor, d: Tensor, s: float, s_next: float, tau: float, noise: Tensor | None,
    d_prev: Tensor | None = None, s_prev: float | None = None,
) -> Tensor:
    """SA-Predictor (stochastic Adams-Bashforth) from ``s`` to ``s_next``: ``(B, *S)``.

    Order 2 when the previous data prediction ``d_prev`` at ``s_prev`` is given: the order-1
    step plus ``(1 + tau^2) (1 - s') h^2 / 2 * (d - d_prev) / (lambda_s - lambda_prev)``, the
    linear interpolation of the data prediction in log-SNR with the exact weight of its slope
    replaced by ``e^{(1 + tau^2) lambda'} h^2 / 2`` (the paper's few-step variant, App. D;
    diffusers' ``SASolverScheduler`` does the same).
    """
    out, h = _sa_base(x, d, s, s_next, tau, noise)
    if d_prev is not None and s_prev is not None:
        slope = (d - d_prev) / (_log_snr(s) - _log_snr(s_prev))
        out = out + (1.0 + tau * tau) * (1.0 - s_next) * 0.5 * h * h * slope
    return out


def sa_corrector_step(
    x: Tensor, d: Tensor, d_next: Tensor, s: float, s_next: float, tau: float, noise: Tensor | None
) -> Tensor:
    """SA-Corrector (stochastic Adams-Moulton, order 2) of the step ``s -> s_next`` taken from
    ``x`` with the same ``noise``, using the data prediction ``d_next`` at the predicted
    state: the order-1 step plus ``(1 + tau^2) (1 - s') h / 2 * (d_next - d)``."""
    out, h = _sa_base(x, d, s, s_next, tau, noise)
    return out + (1.0 + tau * tau) * (1.0 - s_next) * 0.5 * h * (d_next - d)


def sa_solver_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    grid: list[float],
    taus: list[float],
    *,
    step_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    first_corrector: bool = False,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """SA-Solver for flow models in PEC mode (predictor order 2, corrector order 2, one
    velocity evaluation per step), as AWM's released rollouts use it.

    Per step ``k``: the velocity is evaluated at the *predicted* state ``x^p_k`` (data
    prediction ``d_k = x^p_k - s_k v``); the corrector then redoes step ``k - 1`` from the
    corrected ``x_{k-1}`` with ``d_k`` (not on step 0 -> 1 unless ``first_corrector``; the
    released sampler skips it, diffusers does not), and the predictor goes on to ``x^p_{k+1}``.
    A step to ``t = 0`` returns the last data prediction ``d_{N-1}``.  A grid starting at 1
    starts at :data:`SA_SOLVER_T_MAX`.

    Args:
        velocity: ``velocity(x, t) -> v`` with ``x`` ``(B, *S)``, ``t`` ``(B,)``.
        noise: ``(B, *S)`` start.  grid: ``N + 1`` decreasing times.
        taus: ``N`` per-step stochasticities (:func:`sa_tau_schedule`); all 0 is an ODE solver.
        step_noise: ``(B, N, *S)`` standard normal draws (else drawn from ``generator``).
    Returns:
        final samples and, if asked, the corrected states ``(B, N + 1, *S)``.
    """
    times = [float(s) for s in grid]
    times[0] = min(times[0], SA_SOLVER_T_MAX)
    n = len(times) - 1
    if len(taus) != n:
        raise ValueError(f"sa_solver needs {n} per-step taus, got {len(taus)}")

    def data_prediction(x_: Tensor, s_: float) -> Tensor:
        t = torch.full((x_.shape[0],), s_, device=x_.device, dtype=x_.dtype)
        return x_ - s_ * velocity(x_, t)

    def draw(k: int) -> Tensor:
        if step_noise is not None:
            return step_noise[:, k]
        return torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)

    x = x_pred = noise
    traj = [x] if keep_trajectory else None
    d_prev = z_prev = None
    for k in range(n):
        s, s_next = times[k], times[k + 1]
        d = data_prediction(x_pred, s)
        if k == 0 or (k == 1 and not first_corrector):
            x = x_pred
        else:
            x = sa_corrector_step(x, d_prev, d, times[k - 1], s, taus[k - 1], z_prev)
        if traj is not None and k > 0:
            traj.append(x)
        if s_next <= 0.0:
            x_pred = d  # denoise to zero: the last data prediction
        else:
            z = draw(k) if taus[k] > 0 else None
            x_pred = sa_predictor_step(x, d, s, s_next, taus[k], z,
                                       d_prev if k > 0 else None, times[k - 1] if k > 0 else None)
            z_prev = z
        d_prev = d
        if k == n - 1:
            x = x_pred
    if traj is not None:
        traj.append(x)
    trajectory = torch.stack(traj, dim=1) if traj is not None else None
    return SampleOutput(x0=x, trajectory=trajectory)


# --------------------------------------------------------------------------- sampling loop


Solver = Literal["euler", "heun", "dpmpp_2m", "sa_solver"]
StochasticKind = Literal["none", "sde", "cps"]


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    Attributes:
        x0: ``(B, *S)`` final samples.
        trajectory: ``(B, N + 1, *S)`` states at every grid point, if asked for.
        log_probs: ``(B, N)`` log-probs of stochastic steps (``nan`` on ODE steps), if any
            step was stochastic.
    """

    x0: Tensor
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None


@torch.no_grad()
def sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    grid: Tensor,
    *,
    solver: Solver = "euler",
    stochastic: StochasticKind = "none",
    noise_level: float = 0.7,
    stochastic_steps: tuple[int, int] | None = None,
    keep_trajectory: bool = False,
    step_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    sa_tau: float = 0.4,
    sa_tau_window: tuple[float, float] = (0.3, 0.9),
) -> SampleOutput:
    """Integrate from ``noise`` at ``t = 1`` down the ``grid`` to ``t = 0``.

    Args:
        velocity: ``velocity(x, t) -> v`` with ``x`` ``(B, *S)`` and ``t`` ``(B,)``
            (conditioning and guidance already bound, e.g. ``partial(policy.velocity, ...)``).
        noise: ``(B, *S)`` the starting state.
        grid: ``(N + 1,)`` decreasing times from 1 to 0.
        solver: the ODE solver for deterministic steps.
        stochastic: ``"sde"`` or ``"cps"`` to make steps stochastic (log-probs recorded).
        stochastic_steps: ``[start, end)`` step indices that are stochastic (Flow-GRPO
            "Fast"); all steps when ``None``.  Other steps use ``solver``.
        keep_trajectory: keep every state (memory ``N + 1`` times the batch).
        step_noise: ``(B, N, *S)`` standard normal draws for the stochastic steps (so that
            each sample's noise is fixed by its own seed); else drawn from ``generator``.
        sa_tau, sa_tau_window: ``solver="sa_solver"`` (:func:`sa_solver_sample`): its
            stochasticity ``tau`` on steps whose target time lies in the window (0: an ODE).
    """
    grid_list = [float(s) for s in grid]
    if solver == "sa_solver":
        if stochastic != "none":
            raise ValueError("the sa_solver solver has its own noise; it does not combine with stochastic steps")
        return sa_solver_sample(velocity, noise, grid_list, sa_tau_schedule(grid_list, sa_tau, sa_tau_window),
                                step_noise=step_noise, generator=generator, keep_trajectory=keep_trajectory)
    n = len(grid_list) - 1
    x = noise
    traj = [x] if keep_trajectory else None
    log_probs = (
        torch.full((x.shape[0], n), float("nan"), device=x.device) if stochastic != "none" else None
    )
    lo, hi = stochastic_steps if stochastic_steps is not None else (0, n)
    x0_prev, s_prev = None, None

    def vel(x_: Tensor, s_: float) -> Tensor:
        return velocity(x_, torch.full((x_.shape[0],), s_, device=x_.device, dtype=x_.dtype))

    for k in range(n):
        s, s_next = grid_list[k], grid_list[k + 1]
        v = vel(x, s)
        if stochastic != "none" and lo <= k < hi:
            z = step_noise[:, k] if step_noise is not None else None
            if stochastic == "sde":
                out = sde_step(
                    x, v, s, s_next, noise_level, s_first=grid_list[1], noise=z, generator=generator
                )
            else:
                out = cps_step(x, v, s, s_next, noise_level, noise=z, generator=generator)
            x_new = out.x_next
            log_probs[:, k] = out.log_prob
        elif solver == "euler":
            x_new = euler_step(x, v, s, s_next)
        elif solver == "heun":
            x_new = heun_step(x, v, s, s_next, vel)
        elif solver == "dpmpp_2m":
            x0_pred = x - s * v
            x_new = dpmpp_2m_step(x, x0_pred, s, s_next, x0_prev, s_prev)
            x0_prev, s_prev = x0_pred, s
        else:
            raise ValueError(f"unknown solver '{solver}' (euler, heun, dpmpp_2m, sa_solver)")
        if solver != "dpmpp_2m" or (stochastic != "none" and lo <= k < hi):
            x0_prev, s_prev = None, None
        x = x_new
        if traj is not None:
            traj.append(x)
        if progress is not None:
            progress(k)
    trajectory = torch.stack(traj, dim=1) if traj is not None else None
    return SampleOutput(x0=x, trajectory=trajectory, log_probs=log_probs)


def bind_velocity(policy: Any, cond: Any, guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """``velocity(x, t)`` of ``policy`` with conditioning and guidance fixed."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return policy.velocity(x, t, cond, guidance_scale=guidance_scale)

    return velocity
