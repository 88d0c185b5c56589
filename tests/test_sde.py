"""The forward SDEs against independent answers: simulation, derivatives, and closed forms."""

import math

import pytest
import torch

from scoreflow.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


def _variance(sde, t, x0_var=0.0):
    alpha, std = sde.marginal_coefs(t)
    return alpha**2 * x0_var + std**2


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_variance_ode_matches_diffusion(name):
    """For dx = f x dt + g dW the conditional variance obeys dV/dt = 2 f V + g^2 (V(0) = 0)."""
    sde = SDES[name]
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    h = 1e-6
    dvar = (_variance(sde, t + h) - _variance(sde, t - h)) / (2 * h)
    rhs = 2 * sde.drift_coef(t) * _variance(sde, t) + sde.diffusion(t) ** 2
    torch.testing.assert_close(dvar, rhs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_mean_ode_matches_drift(name):
    """d alpha / dt = f(t) alpha with alpha(0) = 1."""
    sde = SDES[name]
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    h = 1e-6
    alpha = lambda s: sde.marginal_coefs(s)[0]
    dalpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
    torch.testing.assert_close(dalpha, sde.drift_coef(t) * alpha(t), rtol=1e-6, atol=1e-9)
    assert alpha(torch.zeros(1, dtype=torch.float64)).item() == 1.0


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_marginals_match_euler_maruyama_simulation(name):
    """Simulate the SDE from a fixed x0 and compare the sample mean and std at t = 0.5 and 1."""
    sde = SDES[name]
    gen = torch.Generator().manual_seed(0)
    n, steps = 20000, 1000
    x0 = 0.7
    x = torch.full((n, 1), x0, dtype=torch.float64)
    dt = 1.0 / steps
    checks = {steps // 2: None, steps: None}
    for i in range(steps):
        t = torch.full((n,), (i + 0.5) * dt, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * noise
        if i + 1 in checks:
            checks[i + 1] = x.clone()
    for k, xs in checks.items():
        t = torch.tensor([k * dt], dtype=torch.float64)
        mean, std = sde.marginal_prob(torch.full((1, 1), x0, dtype=torch.float64), t)
        se_mean = float(std) / math.sqrt(n)
        assert abs(xs.mean().item() - mean.item()) < 5 * se_mean + 2e-3 * float(std)
        assert abs(xs.std().item() / float(std) - 1) < 0.03


def test_small_time_precision():
    """At t = 1e-5 the stds are about 1e-3 (VP) and 1e-6 (subVP) to full relative precision."""
    t = torch.tensor([1e-5], dtype=torch.float32)
    b = 0.1 * 1e-5 + 0.5 * 19.9 * 1e-10  # B(t) in exact arithmetic (float64)
    vp_std = VPSDE().marginal_coefs(t)[1].item()
    subvp_std = SubVPSDE().marginal_coefs(t)[1].item()
    assert vp_std == pytest.approx(math.sqrt(-math.expm1(-b)), rel=1e-5)
    assert subvp_std == pytest.approx(-math.expm1(-b), rel=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_prior_logp_is_the_gaussian_density(name):
    sde = SDES[name]
    z = sde.prior_sampling((3, 2, 2), generator=torch.Generator().manual_seed(1))
    dist = torch.distributions.Normal(0.0, sde.prior_std)
    expected = dist.log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected, rtol=1e-5, atol=1e-4)
    # the entropy is minus the expected log-density
    many = sde.prior_sampling((20000, 4), generator=torch.Generator().manual_seed(2))
    assert -sde.prior_logp(many).mean().item() == pytest.approx(sde.prior_entropy(4), rel=1e-2)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_marginal_at_T_is_close_to_the_prior(name):
    alpha, std = SDES[name].marginal_coefs(torch.tensor([1.0]))
    assert alpha.item() < 0.01 and abs(std.item() - 1) < 1e-3


def test_integrated_beta_inverse():
    sde = VPSDE()
    t = torch.tensor([0.0, 1e-7, 1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.time_from_integrated_beta(sde.integrated_beta(t)), t)


def test_vp_discretisation_is_the_ddpm_chain():
    """One step of the VP chain keeps unit variance data at unit variance."""
    sde = VPSDE()
    t = torch.full((50000,), 0.5)
    x = torch.randn(50000, 1, generator=torch.Generator().manual_seed(3))
    f, g = sde.discretize(x, t, num_steps=1000)
    z = torch.randn(50000, 1, generator=torch.Generator().manual_seed(4))
    nxt = x + f + g[:, None] * z
    assert nxt.var().item() == pytest.approx(x.var().item(), rel=2e-3)
