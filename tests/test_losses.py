"""Denoising score matching losses against closed forms on Gaussian data.

For data x0 ~ N(m, diag(v)) the exact score of p_t gives, per dimension and fixed t,

    E||std s(x_t, t) + z||^2 = 1 - std^2 / (alpha^2 v + std^2) = alpha^2 v / (alpha^2 v + std^2),

(write u = x_t - alpha m with Var u = V = alpha^2 v + std^2 and s = -u / V; then
E(z - std u / V)^2 = 1 - 2 std^2 / V + std^2 / V). That is the minimum of the DSM objective at t.
The expectations over t are computed here by quadrature, with the SDE coefficients written out
from their formulas (not taken from scoreflow.sde).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoreflow.importance import ImportanceSampler
from scoreflow.losses import dsm_loss, weighting_name
from scoreflow.score import exact_gaussian_score_fn
from scoreflow.sde import VPSDE, SubVPSDE

B0, B1 = 0.1, 20.0
MEAN = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64).reshape(1, 2, 2)
VAR = torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64).reshape(1, 2, 2)


def _coefs(kind: str, t: float) -> tuple[float, float, float]:
    """(alpha^2, std^2, g^2) of the VP or subVP SDE at t, from the SPEC formulas."""
    b = B0 * t + (B1 - B0) * t * t / 2
    beta = B0 + t * (B1 - B0)
    alpha2 = math.exp(-b)
    if kind == "vp":
        return alpha2, -math.expm1(-b), beta
    return alpha2, math.expm1(-b) ** 2, beta * -math.expm1(-2 * b)


def _fisher(kind: str, t: float) -> float:
    """Mean over dimensions of alpha^2 v / (alpha^2 v + std^2): the minimal DSM value at t."""
    alpha2, std2, _ = _coefs(kind, t)
    v = VAR.flatten().numpy()
    return float(np.mean(alpha2 * v / (alpha2 * v + std2)))


def _expected(kind: str, eps: float, likelihood: bool) -> float:
    """E_{t ~ U[eps, 1]} of the minimal DSM value, weighted by g^2/std^2 if ``likelihood``."""

    def integrand(t: float) -> float:
        _, std2, g2 = _coefs(kind, t)
        return _fisher(kind, t) * (g2 / std2 if likelihood else 1.0)

    points = [eps * 10**k for k in range(1, 6) if eps * 10**k < 1]
    value, _ = integrate.quad(integrand, eps, 1.0, points=points, limit=500, epsabs=1e-10)
    return value / (1.0 - eps)


def _data(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MEAN + VAR.sqrt() * torch.randn((n, 1, 2, 2), generator=gen, dtype=torch.float64)


def _exact_noise_fn(sde):
    score_fn = exact_gaussian_score_fn(sde, MEAN, VAR)

    def noise_fn(x, t):
        std = sde.marginal_coefs(t)[1].reshape(-1, 1, 1, 1)
        return std * score_fn(x, t)

    return noise_fn


def _check(losses: torch.Tensor, expected: float, scale: float = 1.0) -> None:
    mean = float(losses.mean()) * scale
    stderr = float(losses.std()) * scale / math.sqrt(losses.numel())
    assert abs(mean - expected) < 5 * stderr + 1e-9, (mean, expected, stderr)


def test_baseline_loss_equals_closed_form_minimum():
    sde = VPSDE(B0, B1)
    x0 = _data(200_000)
    gen = torch.Generator().manual_seed(1)
    loss, losses = dsm_loss(sde, _exact_noise_fn(sde), x0, "baseline", 1e-5, True, gen)
    assert losses.shape == (x0.shape[0],)
    assert torch.isclose(loss, losses.mean())
    _check(losses, _expected("vp", 1e-5, likelihood=False))


@pytest.mark.parametrize("kind", ["vp", "subvp"])
def test_likelihood_and_importance_weightings_agree_up_to_z(kind):
    sde = VPSDE(B0, B1) if kind == "vp" else SubVPSDE(B0, B1)
    eps = 1e-2  # the variance of plain likelihood weighting grows like 1/eps
    expected = _expected(kind, eps, likelihood=True)
    x0 = _data(200_000, seed=2)
    noise_fn = _exact_noise_fn(sde)

    _, likelihood = dsm_loss(
        sde, noise_fn, x0, "likelihood", eps, True, torch.Generator().manual_seed(3)
    )
    _check(likelihood, expected)

    sampler = ImportanceSampler(sde, eps)
    _, importance = dsm_loss(
        sde, noise_fn, x0, "importance", eps, True, torch.Generator().manual_seed(4), sampler
    )
    # E_p[loss] = (T - eps) / Z * E_U[likelihood-weighted loss]
    _check(importance, expected, scale=sampler.normalizer / (1.0 - eps))
    # importance sampling is the variance reduction it promises
    assert (importance * sampler.normalizer / (1 - eps)).std() < likelihood.std()


def test_importance_weighting_at_small_eps():
    sde = VPSDE(B0, B1)
    eps = 1e-5
    sampler = ImportanceSampler(sde, eps)
    x0 = _data(100_000, seed=5)
    _, losses = dsm_loss(
        sde, _exact_noise_fn(sde), x0, "importance", eps, True, torch.Generator().manual_seed(6)
    )
    _check(losses, _expected("vp", eps, likelihood=True), scale=sampler.normalizer / (1 - eps))


def test_exact_score_minimises_the_loss():
    sde = SubVPSDE(B0, B1)
    x0 = _data(20_000, seed=7)
    exact = _exact_noise_fn(sde)
    for weighting in ("baseline", "likelihood"):
        base, _ = dsm_loss(sde, exact, x0, weighting, 1e-2, True, torch.Generator().manual_seed(8))
        for factor in (0.8, 1.2):
            worse, _ = dsm_loss(
                sde,
                lambda x, t, f=factor: f * exact(x, t),
                x0,
                weighting,
                1e-2,
                True,
                torch.Generator().manual_seed(8),
            )
            assert worse > base


@pytest.mark.parametrize("weighting", ["baseline", "likelihood", "importance"])
def test_half_sum_is_half_dimension_times_mean(weighting):
    sde = VPSDE(B0, B1)
    x0 = _data(64, seed=9)
    noise_fn = _exact_noise_fn(sde)
    _, mean = dsm_loss(sde, noise_fn, x0, weighting, 1e-5, True, torch.Generator().manual_seed(1))
    _, half = dsm_loss(sde, noise_fn, x0, weighting, 1e-5, False, torch.Generator().manual_seed(1))
    dim = x0[0].numel()
    torch.testing.assert_close(half, 0.5 * dim * mean)


class _Tiny(torch.nn.Module):
    """A stand-in network: forward(x, time_cond) -> tensor shaped like x."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, time_cond):
        return self.conv(x) * torch.tanh(time_cond / 999).reshape(-1, 1, 1, 1)


def test_module_input_gives_gradients_and_is_reproducible():
    sde = VPSDE(B0, B1)
    model = _Tiny()
    x0 = _data(8).float()
    loss, losses = dsm_loss(
        sde, model, x0, "importance", 1e-5, True, torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert losses.shape == (8,) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    again, _ = dsm_loss(sde, model, x0, "importance", 1e-5, True, torch.Generator().manual_seed(0))
    assert torch.equal(loss.detach(), again.detach())


def test_weighting_name_and_errors():
    assert weighting_name(False, False) == "baseline"
    assert weighting_name(True, False) == "likelihood"
    assert weighting_name(True, True) == "importance"
    with pytest.raises(ValueError):
        weighting_name(False, True)
    with pytest.raises(ValueError):
        dsm_loss(VPSDE(), _Tiny(), _data(2).float(), "bogus")  # type: ignore[arg-type]
