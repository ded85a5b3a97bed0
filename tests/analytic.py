"""Closed forms for Gaussian data, against which samplers are tested.

For ``x0 ~ N(mu, s0^2 I)`` and ``x_t = (1 - t) x0 + t eps``, ``x_t`` is Gaussian with mean
``(1 - t) mu`` and variance ``(1 - t)^2 s0^2 + t^2``, and the exact velocity is
``v(x, t) = E[eps - x0 | x_t = x] = mu_term + k (x - (1 - t) mu)`` with
``k = (t - (1 - t) s0^2) / var_t`` and ``mu_term = -mu``.
"""

from __future__ import annotations

from torch import Tensor


class GaussianFlow:
    """The exact rectified-flow velocity of ``N(mu, s0^2 I)`` data."""

    def __init__(self, mu: float, s0: float) -> None:
        self.mu, self.s0 = mu, s0

    def var(self, t: Tensor | float) -> Tensor | float:
        return (1 - t) ** 2 * self.s0**2 + t**2

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        var = (1 - t) ** 2 * self.s0**2 + t**2
        centred = x - (1 - t) * self.mu
        e_eps = t / var * centred
        e_x0 = self.mu + (1 - t) * self.s0**2 / var * centred
        return e_eps - e_x0
