"""Importance sampling of t: the sampler against the density, by quadrature and by a KS test."""

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from scoreflow.importance import ImportanceSampler
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

CASES = [(VPSDE(), 1e-5, 23.86), (SubVPSDE(), 1e-2, 22.48)]


def _weight(sde, s):
    t = torch.tensor([s], dtype=torch.float64)
    _, std = sde.marginal_coefs(t)
    return float(sde.diffusion(t) ** 2 / std**2)


@pytest.mark.parametrize("sde,eps,z_published", CASES)
def test_normaliser_equals_quadrature_and_published_value(sde, eps, z_published):
    sampler = ImportanceSampler(sde, eps)
    # integrate g^2/std^2 directly (log-spaced breakpoints handle the 1/t peak at eps)
    points = list(np.geomspace(eps, 1.0, 12))
    total = sum(
        integrate.quad(lambda s: _weight(sde, s), a, b, epsabs=1e-12, epsrel=1e-12)[0]
        for a, b in zip(points[:-1], points[1:], strict=True)
    )
    assert sampler.normalizer == pytest.approx(total, rel=1e-8)
    assert sampler.normalizer == pytest.approx(z_published, abs=0.01)


@pytest.mark.parametrize("sde,eps,_", CASES)
def test_cdf_is_the_integral_of_the_density(sde, eps, _):
    sampler = ImportanceSampler(sde, eps)
    for t_end in [2 * eps, 0.01 + eps, 0.3, 0.9]:
        quad = integrate.quad(
            lambda s: float(sampler.density(torch.tensor(s, dtype=torch.float64))),
            eps,
            t_end,
            points=[min(t_end, 10 * eps)] if t_end > 10 * eps else None,
            epsabs=1e-12,
            limit=200,
        )[0]
        cdf = float(sampler.cdf(torch.tensor(t_end, dtype=torch.float64)))
        assert cdf == pytest.approx(quad, abs=1e-7)


@pytest.mark.parametrize("sde,eps,_", CASES)
def test_inverse_cdf_inverts(sde, eps, _):
    sampler = ImportanceSampler(sde, eps)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    t = sampler.inverse_cdf(u)
    assert t.min() >= eps and t.max() <= 1.0
    torch.testing.assert_close(sampler.cdf(t), u, atol=1e-10, rtol=0)


@pytest.mark.parametrize("sde,eps,_", CASES)
def test_samples_follow_p_t_kolmogorov_smirnov(sde, eps, _):
    """KS test of the samples against F(t) by quadrature of g^2/std^2 (not the code's own CDF)."""
    sampler = ImportanceSampler(sde, eps)
    t = sampler.sample((4000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = np.concatenate([np.geomspace(eps, 0.05, 400), np.linspace(0.05, 1.0, 400)[1:]])
    dens = np.array([_weight(sde, s) for s in grid])
    cum = integrate.cumulative_trapezoid(dens, grid, initial=0.0)
    # trapezoid on the log grid is accurate to ~1e-5 relative; normalise by its own total
    cdf = lambda x: np.interp(x, grid, cum / cum[-1])
    result = stats.kstest(t.numpy(), cdf)
    assert result.pvalue > 1e-3, result


def test_ve_is_rejected_with_reason():
    with pytest.raises(NotImplementedError, match="VP and subVP"):
        ImportanceSampler(VESDE(), 1e-5)


def test_importance_weighted_estimator_is_unbiased():
    """E_p[h(t) w(t) / p(t)] over p equals the integral of h w: the identity losses rely on."""
    sde = VPSDE()
    sampler = ImportanceSampler(sde, 1e-5)
    h = lambda s: torch.sin(3 * s) ** 2 + 0.1
    t = sampler.sample((200000,), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    estimate = (h(t) * sampler.normalizer).mean().item()  # w / p = Z
    exact = integrate.quad(
        lambda s: float(h(torch.tensor(s))) * _weight(sde, s),
        1e-5,
        1,
        points=[1e-4, 1e-3],
        limit=200,
    )[0]
    assert estimate == pytest.approx(exact, rel=0.01)
