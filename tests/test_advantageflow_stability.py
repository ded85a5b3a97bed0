"""AdvantageFlow's stability: the trust-region loss against the paper's, and a regression run.

The regression run is the shipped 2-D config at three times its learning rate for 40 epochs:
with the paper's loss (``target_radius: 0``, ``adaptive_weight: true``) the rollouts leave the
data's support at epoch 15 (``stats/x0_absmax`` > 10, later 1e17) and the held-out reward falls
back to 0.34 by epoch 40 (docs/algorithms/advantageflow.md, "Stability"); the shipped default
must stay finite, keep its rollouts near the data and keep its reward.
"""

from __future__ import annotations

import math

import torch

from advantageflow.algorithms.advantageflow import (
    AdvantageFlow,
    advantageflow_loss,
    per_sample_minimiser,
    trust_region_loss,
)
from advantageflow.config import load_config
from advantageflow.runlog import read_metrics
from advantageflow.sampling import time_grid
from advantageflow.trainer import train
from advantageflow.types import Rollout
from tests.conftest import REPO
from tests.policies import PerSamplePolicy, minimise_losses


def _tensors(seed: int, b: int = 6, d: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x0, f_old, f_ref = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(3))
    adv = torch.tensor([-1.0, -0.7, -0.2, 0.0, 0.4, 1.0], dtype=torch.float64)[:b]
    return x0, f_old, f_ref, adv


def test_trust_region_gradient_equals_the_papers_when_no_target_is_moved():
    x0, f_old, f_ref, adv = _tensors(0)
    f = (f_old + 0.1 * torch.randn_like(f_old)).requires_grad_(True)
    (g_paper,) = torch.autograd.grad(advantageflow_loss(f, x0, f_old, f_ref, adv, 1.1, 0.05)[0].sum(), f)
    (g_trust,) = torch.autograd.grad(trust_region_loss(f, x0, f_old, f_ref, adv, 1.1, 0.05, 1e9).sum(), f)
    assert torch.allclose(g_paper, g_trust, atol=1e-12)


def test_trust_region_minimiser_is_the_target_moved_to_the_radius():
    x0, f_old, f_ref, adv = _tensors(1)
    gamma, lam, radius = 1.1, 0.05, 0.2
    free = per_sample_minimiser(x0, f_old, f_ref, adv, gamma, lam)
    free_step = ((free - f_old) ** 2).mean(dim=1).sqrt()
    assert (free_step > radius).any() and (free_step < radius).any(), "need clipped and unclipped samples"
    # Each per-sample loss is a quadratic in f with positive curvature: its minimiser is where
    # the gradient vanishes.  Unclipped samples keep the paper's minimiser; clipped ones stop at
    # the radius, on the segment from f_old towards it.
    inside = (free_step <= radius)[:, None]
    expected = torch.where(inside, free, f_old + radius * (free - f_old) / free_step[:, None])
    f = expected.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(trust_region_loss(f, x0, f_old, f_ref, adv, gamma, lam, radius).sum(), f)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)
    # while at the paper's minimiser the clipped samples are still pulled back
    f_free = free.clone().requires_grad_(True)
    (grad_free,) = torch.autograd.grad(trust_region_loss(f_free, x0, f_old, f_ref, adv, gamma, lam, radius).sum(),
                                       f_free)
    assert (grad_free[~inside[:, 0]].abs().amax(dim=1) > 1e-3).all()


def test_training_a_linear_model_reaches_the_scaled_and_clipped_minimiser():
    """Through the algorithm class: negatives scaled by ``negative_scale``, then each sample's
    target moved to within ``target_radius`` (in ``f``) of the old policy."""
    b, d = 6, 3
    policy = PerSamplePolicy(b, d)
    adv_raw = torch.tensor([-5.0, -3.0, -1.0, 0.5, 2.5, 5.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    x0 = 3.0 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    batch = Rollout(
        x0=x0, noise=torch.zeros_like(x0), cond=torch.arange(b), prompts=[""] * b,
        group_ids=torch.zeros(b, dtype=torch.long), grid=time_grid(10), metadata=[{}] * b, advantages=adv_raw,
    )
    cfg = AdvantageFlow.Config(gamma=1.1, lambda_ref=0.3, adaptive_weight=False, negative_scale=0.5,
                               target_radius=0.3, t_min=0.2, t_max=0.9)
    algo = AdvantageFlow(cfg, policy)
    algo.begin_epoch(policy)
    p_old = policy.param.detach().clone()
    algo.old.fresh = False
    minimise_losses(algo, batch, policy, max_iter=500)
    x_t, t = policy.last_inputs
    tt = t[:, None]
    a = adv_raw[:, None] / 5.0
    a = torch.where(a < 0, 0.5 * a, a)
    u = (x_t - x0) / tt
    p_free = (a * u + cfg.gamma * p_old + cfg.lambda_ref * policy.ref_param) / (a + cfg.gamma + cfg.lambda_ref)
    f_step = (tt * (p_free - p_old)).pow(2).mean(dim=1, keepdim=True).sqrt()  # f = x_t - t P
    shrink = (cfg.target_radius / f_step).clamp(max=1.0)
    assert (shrink < 1).any() and (shrink == 1).any(), "need clipped and unclipped samples"
    expected = p_old + shrink * (p_free - p_old)
    assert torch.allclose(policy.param.detach(), expected, atol=1e-6)


def test_shipped_toy_config_stays_finite_at_three_times_its_lr(tmp_path, toy_overrides):
    """Regression: with the paper's loss this run's rollouts pass |x0| = 10 at epoch 15."""
    shipped = load_config(str(REPO / "configs" / "toy2d_advantageflow.yaml"))
    epochs = 40
    cfg = load_config(str(REPO / "configs" / "toy2d_advantageflow.yaml"), toy_overrides + [
        f"train.lr={3 * shipped.train.lr}", f"train.epochs={epochs}", "eval.every=20",
        "eval.samples_per_prompt=512", f"checkpoint.every={epochs}", "advantageflow.diagnostics=true",
    ])
    train(cfg, tmp_path / "run")  # raises TrainingError if non-finite updates stop the run
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    trained = [r for r in rows if "stats/x0_mse" in r]
    assert len(trained) == epochs
    assert not any("stats/skipped_updates" in r for r in rows)
    # The rollouts stay near the data (the mixture's modes lie within radius ~4).
    assert max(float(r["stats/x0_absmax"]) for r in trained) < 10.0
    assert max(float(r["stats/x0_mse"]) for r in trained) < 20.0
    evals = [float(r["eval/rewarded_fraction"]) for r in rows if "eval/rewarded_fraction" in r]
    assert evals[-1] > evals[0] + 0.3, evals


def test_stability_benchmark_summary_reads_drops_and_non_finite_rows():
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.stability import Cell, summarize

    def row(epoch, value=None, **extra):
        out = {"epoch": epoch, "perf/epoch_s": 0.01, "stats/x0_mse": 1.0, **extra}
        if value is not None:
            out["eval/rewarded_fraction"] = value
        return out

    rows = [{"epoch": 0, "eval/rewarded_fraction": 0.3}, row(1), row(2, 0.9), row(3, 0.6), row(4, 0.88)]
    cell = summarize(Cell("x", "advantageflow", 0, 1.0, 1e-3, 4), rows, 0.05)
    assert (cell.best, cell.best_epoch, cell.min_after, cell.final) == (0.9, 2, 0.6, 0.88)
    assert math.isclose(cell.drop, 0.3) and cell.first_nonfinite_epoch is None and not cell.stable
    # The logger writes non-finite floats as strings; a skipped update counts too.
    rows = [{"epoch": 0, "eval/rewarded_fraction": 0.3}, row(1, 0.5), row(2, **{"loss/total": "nan"}),
            row(3, 0.52, **{"stats/skipped_updates": 1})]
    cell = summarize(Cell("x", "advantageflow", 0, 1.0, 1e-3, 3), rows, 0.05)
    assert cell.first_nonfinite_epoch == 2 and not cell.stable
    rows = [{"epoch": 0, "eval/rewarded_fraction": 0.3}, row(1, 0.5), row(2, 0.48)]
    assert summarize(Cell("x", "advantageflow", 0, 1.0, 1e-3, 2), rows, 0.05).stable
