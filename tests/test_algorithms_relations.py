"""docs/algorithms/README.md, "How the methods relate": on-policy gradients of the forward-process losses.

At the first inner step (theta = old), with uniform weighting and no clipping, AdvantageFlow
(lambda = 0), AWM, EPG (rho = 1) and RAM's reward term all have the gradient of
``mean_i A_i ||v_theta - u_i||^2`` up to a known factor:

- AdvantageFlow: ``||f - x0||^2 = t^2 ||v - u||^2`` and ``A / 5`` -> ``t^2 / 5``;
- AWM (uniform): ``-A/5 * exp(LP - sg LP)`` with ``LP = -m`` -> ``1 / 5``;
- EPG: ``-sg(rho) A l`` with ``rho = 1``, ``l = -m`` -> ``1``;
- RAM: semigradient of ``||v - v_ref||^2 + eta A ||v - u||^2`` -> ``eta`` (at theta = ref).

DiffusionNFT (unit adaptive weights): ``x0+/- - x0 = t (u - v+/-)``, so with
``d = v - v_old``, ``e = u - v_old`` and ``2 r - 1 = A_c / 5`` (``A_c = clip(A, -5, 5)``)::

    (r l+ + (1 - r) l-) / beta * 5 = t^2 [5 ||e||^2 / beta + 5 beta ||d||^2 - 2 A_c <e, d>]

whose gradient is that of ``t^2 [A_c ||v - u||^2 + (5 beta - A_c) ||v - v_old||^2]``: the
exact factor is ``t^2`` per sample, and the identity holds for any old policy.

All losses see the same ``(t, eps)`` (one seeded generator) and the same network.
"""

from __future__ import annotations

import pytest
import torch

from advantageflow.algorithms.advantageflow import advantageflow_loss
from advantageflow.algorithms.awm import awm_loss
from advantageflow.algorithms.common import noised, scaled_advantages, x0_prediction
from advantageflow.algorithms.diffusion_nft import nft_loss, optimality_probability
from advantageflow.algorithms.epg import elbo_surrogate, epg_loss
from advantageflow.algorithms.ram import ram_loss
from advantageflow.models.toy import ToyMLPPolicy, VelocityMLP
from advantageflow.types import mean_flat

B = 32


def setup(shared_t: bool, seed: int = 0):
    torch.manual_seed(seed)
    policy = ToyMLPPolicy(VelocityMLP(2, hidden=32, depth=2))
    g = torch.Generator().manual_seed(seed)
    x0 = 3.0 * torch.randn(B, 2, generator=g)
    adv = 3.0 * torch.randn(B, generator=g)  # some beyond +-5, to exercise the clip
    t = torch.full((B,), 0.37) if shared_t else torch.rand(B, generator=g) * 0.9 + 0.05
    eps = torch.randn(B, 2, generator=g)
    x_t = noised(x0, t, eps)
    return policy, x0, adv, t, eps, x_t


def flat_grad(loss, policy) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, policy.trainable_parameters())])


def assert_parallel(grad: torch.Tensor, reference: torch.Tensor, factor: float) -> None:
    cos = torch.nn.functional.cosine_similarity(grad, reference, dim=0)
    assert float(cos) > 1 - 1e-5
    expected = factor * reference
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def reference_grads(policy, adv, t, u, x_t):
    """``G = grad mean A ||v - u||^2`` and ``G_t2 = grad mean A t^2 ||v - u||^2``."""
    v = policy.velocity(x_t, t)
    g = flat_grad((adv * mean_flat((v - u) ** 2)).mean(), policy)
    v = policy.velocity(x_t, t)
    g_t2 = flat_grad((adv * t**2 * mean_flat((v - u) ** 2)).mean(), policy)
    return g, g_t2


@pytest.mark.parametrize("shared_t", [True, False])
def test_forward_process_gradients_are_parallel_on_policy(shared_t):
    policy, x0, adv, t, eps, x_t = setup(shared_t)
    u = eps - x0
    adv_c = adv.clamp(-5, 5)  # AWM / AdvantageFlow clip to +-5 then divide by 5
    g, g_t2 = reference_grads(policy, adv_c, t, u, x_t)
    assert g.norm() > 0

    # AdvantageFlow, lambda = 0, no adaptive weight; f_old = sg(f_theta).
    f = x0_prediction(x_t, t, policy.velocity(x_t, t))
    af, _ = advantageflow_loss(f, x0, f.detach(), None, scaled_advantages(adv_c, 5.0), 1.1, 0.0)
    g_af = flat_grad(af.mean(), policy)
    assert_parallel(g_af, g_t2, 1 / 5)
    if shared_t:
        assert_parallel(g_af, g, 0.37**2 / 5)

    # AWM, uniform weighting, on-policy ratio (no clip in effect), no regularisers.
    v = policy.velocity(x_t, t)
    awm = awm_loss(v, u, t, scaled_advantages(adv_c, 5.0), weighting="uniform", clip_range=1e9)
    assert_parallel(flat_grad(awm.loss.mean(), policy), g, 1 / 5)

    # EPG with rho = 1 (l_old = sg(l_theta)), one draw, beta = 0.
    v = policy.velocity(x_t, t)
    l_theta = elbo_surrogate(v, u, 1)
    epg = epg_loss(l_theta, l_theta.detach(), adv_c)
    assert_parallel(flat_grad(epg.loss.mean(), policy), g, 1.0)

    # RAM at theta = ref: the reference pull vanishes, the reward term is eta * G.
    with torch.no_grad(), policy.reference():
        v_ref = policy.velocity(x_t, t)
    v = policy.velocity(x_t, t)
    ram = ram_loss(v, v_ref, u, adv_c, eta=50.0)
    assert_parallel(flat_grad(ram.loss.mean(), policy), g, 50.0)


def test_ram_semigradient_is_reference_pull_plus_eta_weighted_flow_matching():
    policy, x0, adv, t, eps, x_t = setup(False, seed=1)
    u = eps - x0
    with torch.no_grad():
        v_ref = policy.velocity(x_t, t) + 0.3 * torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    eta = 7.0
    v = policy.velocity(x_t, t)
    g_ram = flat_grad(ram_loss(v, v_ref, u, adv, eta).loss.mean(), policy)
    v = policy.velocity(x_t, t)
    expected = mean_flat((v - v_ref) ** 2) + eta * adv * mean_flat((v - u) ** 2)
    torch.testing.assert_close(g_ram, flat_grad(expected.mean(), policy), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_is_t2_times_anchored_advantage_weighted_flow_matching(beta):
    policy, x0, adv, t, eps, x_t = setup(False, seed=3)
    u = eps - x0
    with torch.no_grad():  # an old policy that differs from theta: the identity is not only on-policy
        v_old = policy.velocity(x_t, t) + 0.2 * torch.randn(B, 2, generator=torch.Generator().manual_seed(4))
    r = optimality_probability(adv)
    v = policy.velocity(x_t, t)
    nft = nft_loss(v, v_old, x_t, x0, t, r, beta, ref_weight=0.0, adaptive_weight=False)
    g_nft = flat_grad(nft.loss.mean(), policy)
    a_c = adv.clamp(-5, 5)
    v = policy.velocity(x_t, t)
    target = t**2 * (a_c * mean_flat((v - u) ** 2) + (5 * beta - a_c) * mean_flat((v - v_old) ** 2))
    g_target = flat_grad(target.mean(), policy)
    assert_parallel(g_nft, g_target, 1.0)
    # The scaled advantage A_c / 5 in place of A_c would be wrong by a visible margin.
    v = policy.velocity(x_t, t)
    wrong = t**2 * (a_c / 5 * mean_flat((v - u) ** 2) + (5 * beta - a_c / 5) * mean_flat((v - v_old) ** 2))
    g_wrong = flat_grad(wrong.mean(), policy)
    assert not torch.allclose(g_nft, g_wrong, rtol=1e-2, atol=1e-4)
