"""Probability-flow ODE likelihood against closed forms (Gaussian data) and brute force.

For data N(mu, Sigma) every marginal of a linear SDE is Gaussian, p_t = N(alpha mu, S_t) with
S_t = alpha^2 Sigma + std^2 I, the exact score is -S_t^{-1} (x - alpha mu), and the probability
flow maps x at time eps to x(T) = alpha_T mu + S_T^{1/2} S_eps^{-1/2} (x - alpha_eps mu) (the
matrices commute). The model's density at x is then, exactly,

    log p(x) = log prior(x(T)) + log p_eps(x) - log p_T(x(T)),

the closed-form p_eps corrected by the (small) mismatch between p_T and the prior.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoreflow.likelihood import (
    _score_and_divergence,
    bits_per_dim,
    bpd_offset,
    draw_probe,
    ode_likelihood,
)
from scoreflow.score import exact_gaussian_flow_logp, exact_gaussian_score_fn
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

CASES = [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)]
DTYPE = torch.float64


class GaussianData:
    """N(mu, Sigma) data under ``sde``: exact score, marginal density and flow map."""

    def __init__(self, sde, dim: int, full: bool, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.sde = sde
        self.mu = 0.5 * torch.randn(dim, generator=gen, dtype=DTYPE)
        if full:
            a = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
            self.cov = 0.3 * a @ a.T / dim + 0.05 * torch.eye(dim, dtype=DTYPE)
        else:
            self.cov = torch.diag(0.05 + 0.5 * torch.rand(dim, generator=gen, dtype=DTYPE))

    def _marginal(self, t: float):
        alpha, std = self.sde.marginal_coefs(torch.tensor(t, dtype=DTYPE))
        cov = alpha**2 * self.cov + std**2 * torch.eye(len(self.mu), dtype=DTYPE)
        return alpha * self.mu, cov

    def score_fn(self, x, t):
        alpha, std = self.sde.marginal_coefs(t)
        eye = torch.eye(len(self.mu), dtype=x.dtype)
        cov = alpha[:, None, None] ** 2 * self.cov.to(x.dtype) + std[:, None, None] ** 2 * eye
        diff = x - alpha[:, None] * self.mu.to(x.dtype)
        return -torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)

    def logp_t(self, x, t: float):
        mean, cov = self._marginal(t)
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)

    def sample(self, n: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        chol = torch.linalg.cholesky(self.cov)
        return self.mu + torch.randn(n, len(self.mu), generator=gen, dtype=DTYPE) @ chol.T

    def model_logp(self, x, eps: float):
        """Exact log-density of the probability-flow model at x (batch, D)."""
        mean_eps, cov_eps = self._marginal(eps)
        mean_end, cov_end = self._marginal(self.sde.T)
        values, vectors = torch.linalg.eigh(self.cov)
        a_eps, s_eps = self.sde.marginal_coefs(torch.tensor(eps, dtype=DTYPE))
        a_end, s_end = self.sde.marginal_coefs(torch.tensor(self.sde.T, dtype=DTYPE))
        ratio = torch.sqrt((a_end**2 * values + s_end**2) / (a_eps**2 * values + s_eps**2))
        flow = vectors @ torch.diag(ratio) @ vectors.T
        z = mean_end + (x - mean_eps) @ flow.T
        return self.sde.prior_logp(z) + self.logp_t(x, eps) - self.logp_t(z, self.sde.T)


def to_bpd(nats, dim):
    return nats / (dim * math.log(2))


@pytest.mark.parametrize("sde,eps", CASES)
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("time_variable", ["sqrt", "t"])
@pytest.mark.parametrize("error_norm", ["joint", "separate"])
def test_exact_divergence_matches_closed_form(sde, eps, full, time_variable, error_norm):
    data = GaussianData(sde, dim=4, full=full)
    x = data.sample(6)
    result = ode_likelihood(
        data.score_fn,
        sde,
        x,
        eps=eps,
        divergence="exact",
        time_variable=time_variable,
        error_norm=error_norm,
    )
    error = to_bpd(result.logp - data.model_logp(x, eps), 4).abs().max()
    assert error < 1e-3
    assert result.nfe > 10
    assert torch.allclose(result.logp, result.prior_logp + result.delta_logp)


@pytest.mark.parametrize("sde,eps", CASES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_image_sized_gaussian_data_to_1e_3_bits_per_dim(sde, eps, dtype):
    """D = 3072 (a 32x32x3 image) with per-dimension variances from 5e-6 (the scale of
    dequantisation noise) to 0.5: with the default error measure, which holds delta_logp to the
    tolerance per dimension, the bits/dim still match the closed form."""
    dim = 3072
    gen = torch.Generator().manual_seed(5)
    var = torch.empty(dim, dtype=DTYPE).uniform_(math.log(5e-6), math.log(0.5), generator=gen)
    var = var.exp()
    mu = 0.5 * torch.randn(dim, generator=gen, dtype=DTYPE)
    x = mu + torch.randn(3, dim, generator=gen, dtype=DTYPE) * var.sqrt()
    score_fn = exact_gaussian_score_fn(sde, mu.to(dtype), var.to(dtype))
    results = {
        norm: ode_likelihood(score_fn, sde, x.to(dtype), eps=eps, divergence="rademacher",
                             generator=gen, error_norm=norm)
        for norm in ("joint", "separate")
    }  # fmt: skip
    exact = exact_gaussian_flow_logp(sde, mu, var, x, eps)
    for result in results.values():  # Rademacher probes are exact for a diagonal Jacobian
        assert to_bpd(result.logp.double() - exact, dim).abs().max() < 1e-3
    assert results["joint"].nfe < results["separate"].nfe


@pytest.mark.parametrize("sde,eps", CASES)
def test_closed_form_density_at_eps_with_exact_score(sde, eps):
    """With diag covariance and the exact_gaussian_score_fn of the library; Rademacher probes
    are exact for a diagonal Jacobian (v_i^2 = 1), so one probe must already match."""
    data = GaussianData(sde, dim=5, full=False, seed=3)
    score_fn = exact_gaussian_score_fn(sde, data.mu, torch.diagonal(data.cov))
    x = data.sample(8, seed=4)
    gen = torch.Generator().manual_seed(0)
    result = ode_likelihood(score_fn, sde, x, eps=eps, divergence="rademacher", generator=gen)
    assert to_bpd(result.logp - data.model_logp(x, eps), 5).abs().max() < 1e-3
    # the closed-form log p_eps itself differs from the model only by the prior mismatch
    assert to_bpd(result.logp - data.logp_t(x, eps), 5).abs().max() < 2e-2


@pytest.mark.parametrize("divergence", ["gaussian", "rademacher"])
def test_hutchinson_average_over_probes_is_unbiased(divergence):
    """Full covariance: the probe matters; the mean over probes matches within its error."""
    sde, eps = VPSDE(), 1e-5
    data = GaussianData(sde, dim=3, full=True, seed=5)
    x = data.sample(2, seed=6)
    repeats = 400
    gen = torch.Generator().manual_seed(1)
    result = ode_likelihood(
        data.score_fn, sde, x.repeat(repeats, 1), eps=eps, divergence=divergence, generator=gen
    )
    logp = result.logp.view(repeats, 2)
    stderr = logp.std(dim=0) / math.sqrt(repeats)
    exact = data.model_logp(x, eps)
    assert ((logp.mean(dim=0) - exact).abs() < 4 * stderr + 1e-3).all()


def test_float32_matches_and_stays_on_input_dtype():
    sde, eps = VPSDE(), 1e-5
    data = GaussianData(sde, dim=4, full=False)
    score_fn = exact_gaussian_score_fn(sde, data.mu.float(), torch.diagonal(data.cov).float())
    x = data.sample(4).float()
    result = ode_likelihood(score_fn, sde, x, eps=eps, divergence="exact")
    assert result.logp.dtype == torch.float32 and result.z.dtype == torch.float32
    assert to_bpd(result.logp.double() - data.model_logp(x.double(), eps), 4).abs().max() < 1e-3


class TinyNet(nn.Module):
    """A small non-linear network (x, t) -> score with a dense Jacobian."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_mean_equals_exact_divergence_of_a_network(kind):
    torch.manual_seed(0)
    dim, num_probes = 5, 20000
    net = TinyNet(dim).double()
    x = torch.randn(1, dim, dtype=DTYPE)
    t = torch.full((1,), 0.3, dtype=DTYPE)
    jacobian = torch.autograd.functional.jacobian(lambda y: net(y, t), x).reshape(dim, dim)
    trace = torch.trace(jacobian)

    gen = torch.Generator().manual_seed(2)
    xs, ts = x.repeat(num_probes, 1), t.repeat(num_probes)
    probe = draw_probe(xs.shape, kind, gen, None, DTYPE)
    score, estimates = _score_and_divergence(net, xs, ts, probe)
    stderr = estimates.std() / math.sqrt(num_probes)
    assert abs(estimates.mean() - trace) < 4 * stderr
    assert torch.allclose(score[0], net(x, t)[0].detach())

    _, exact = _score_and_divergence(net, x, t, None)
    assert torch.allclose(exact, trace.reshape(1))


def test_network_score_function_runs_and_counts_evaluations():
    torch.manual_seed(0)
    net = TinyNet(3).double()
    x = torch.randn(4, 3, dtype=DTYPE)
    result = ode_likelihood(net, VPSDE(), x, eps=1e-3, rtol=1e-4, atol=1e-4, divergence="exact")
    assert torch.isfinite(result.logp).all() and result.nfe >= 6
    assert result.z.shape == x.shape


def test_per_example_generators_make_probes_independent_of_the_batch():
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    probes = draw_probe((3, 7), "rademacher", gens, None, torch.float32)
    alone = draw_probe(
        (1, 7), "rademacher", [torch.Generator().manual_seed(12)], None, torch.float32
    )
    assert torch.equal(probes[1], alone[0])
    assert set(probes.unique().tolist()) <= {-1.0, 1.0}


def test_bpd_offset_gives_eight_bits_for_uniform_data():
    """A model uniform on the data range must give exactly 8 bits per 8-bit dimension."""
    dim = 12
    # centred data in [-1, 1]: density 2^-D, -log p = D log 2
    centred = bits_per_dim(torch.tensor(dim * math.log(2)), dim, bpd_offset(0.5))
    # data in [0, 1]: density 1
    unit = bits_per_dim(torch.tensor(0.0), dim, bpd_offset(1.0))
    assert bpd_offset(0.5) == 7.0
    assert centred.item() == pytest.approx(8.0) and unit.item() == pytest.approx(8.0)
