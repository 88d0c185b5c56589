"""The variational bound against closed forms on Gaussian data.

For data N(mu, diag(v)) and the exact score, the model's density at t = eps is p_eps =
N(alpha mu, alpha^2 v + std^2) (up to the prior mismatch at T, negligible for mu = 0), and the
Tweedie decoder m(y) = (y + std^2 s(y)) / alpha is linear, so the density that the bound with its
[0, eps] offset bounds is Gaussian too:

    p(x_0) = int p_eps(y) N(x_0; m(y), std^2 / alpha^2) dy
           = N(mu, alpha^2 v^2 / (alpha^2 v + std^2) + std^2 / alpha^2).

Without the offset the sum of the prior and diffusion terms bounds the cross-entropy
E_{y ~ N(alpha x_0, std^2)}[-log p_eps(y)].
"""

from __future__ import annotations

import math

import pytest
import torch

from scoreflow.bound import diffusion_term, negative_elbo, offset_term, prior_term
from scoreflow.score import exact_gaussian_score_fn
from scoreflow.sde import VPSDE, SubVPSDE

DTYPE = torch.float64
CASES = [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2)]


def gaussian_case(sde, dim, mean_scale=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = mean_scale * torch.randn(dim, generator=gen, dtype=DTYPE)
    var = 0.05 + 0.5 * torch.rand(dim, generator=gen, dtype=DTYPE)
    x = mu + var.sqrt() * torch.randn(8, dim, generator=gen, dtype=DTYPE)
    return mu, var, x


def coefs(sde, t):
    return sde.marginal_coefs(torch.tensor(t, dtype=DTYPE))


def gaussian_nll(x, mean, var):
    return (0.5 * torch.log(2 * math.pi * var) + (x - mean) ** 2 / (2 * var)).sum(dim=-1)


def repeated_bound(score_fn, sde, x, eps, repeats, num_times, **kwargs):
    """(mean over repeats (batch,), its standard error (batch,)) of the bound in nats."""
    gen = torch.Generator().manual_seed(123)
    values = negative_elbo(
        score_fn, sde, x.repeat(repeats, 1), eps, num_times, generator=gen, **kwargs
    ).view(repeats, x.shape[0])
    return values.mean(dim=0), values.std(dim=0) / math.sqrt(repeats)


@pytest.mark.parametrize("sde,eps", CASES)
@pytest.mark.parametrize("importance_weighting", [True, False])
def test_bound_is_tight_and_above_exact_nll_with_exact_score(sde, eps, importance_weighting):
    dim = 2
    mu, var, x = gaussian_case(sde, dim)
    score_fn = exact_gaussian_score_fn(sde, mu, var)
    alpha, std = coefs(sde, eps)
    model_var = alpha**2 * var**2 / (alpha**2 * var + std**2) + std**2 / alpha**2
    exact = gaussian_nll(x, mu, model_var)

    bound, stderr = repeated_bound(
        score_fn, sde, x, eps, 2000, 100, importance_weighting=importance_weighting
    )
    gap = (bound - exact).mean() / (dim * math.log(2))
    gap_stderr = (stderr**2).sum().sqrt() / x.shape[0] / (dim * math.log(2))
    assert gap > -4 * gap_stderr
    assert gap < 4 * gap_stderr + 0.01


@pytest.mark.parametrize("sde,eps", CASES)
def test_bound_without_offset_matches_cross_entropy_at_eps(sde, eps):
    dim = 2
    mu, var, x = gaussian_case(sde, dim, seed=1)
    score_fn = exact_gaussian_score_fn(sde, mu, var)
    alpha, std = coefs(sde, eps)
    marginal_var = alpha**2 * var + std**2
    cross_entropy = (
        0.5 * torch.log(2 * math.pi * marginal_var)
        + (alpha**2 * (x - mu) ** 2 + std**2) / (2 * marginal_var)
    ).sum(dim=-1)

    bound, stderr = repeated_bound(score_fn, sde, x, eps, 2000, 100, offset=False)
    gap = (bound - cross_entropy).mean()
    gap_stderr = (stderr**2).sum().sqrt() / x.shape[0]
    assert abs(gap) < 4 * gap_stderr + 0.01 * dim * math.log(2)


def test_bound_of_a_wrong_score_is_above_the_data_entropy():
    """Any score: E_x[bound] >= E_x[-log p_model(x)] >= entropy of the data, with a clear gap
    when the score is wrong, and none when it is exact."""
    sde, eps, dim = VPSDE(), 1e-5, 2
    gen = torch.Generator().manual_seed(7)
    mu = torch.tensor([0.3, -0.2], dtype=DTYPE)
    var = torch.tensor([0.2, 0.4], dtype=DTYPE)
    x = mu + var.sqrt() * torch.randn(4000, dim, generator=gen, dtype=DTYPE)
    entropy = (0.5 * torch.log(2 * math.pi * math.e * var)).sum()

    def mean_bound(score_fn):
        values = negative_elbo(score_fn, sde, x, eps, 100, generator=gen)
        return values.mean(), values.std() / math.sqrt(x.shape[0])

    exact_mean, exact_err = mean_bound(exact_gaussian_score_fn(sde, mu, var))
    wrong_mean, wrong_err = mean_bound(exact_gaussian_score_fn(sde, mu, 3 * var))
    assert abs(exact_mean - entropy) < 4 * exact_err + 0.01
    assert wrong_mean - entropy > 4 * wrong_err + 0.1


def test_terms_add_up_and_the_entropy_is_in_the_offset():
    sde, eps = VPSDE(), 1e-5
    mu, var, x = gaussian_case(sde, 3, mean_scale=0.5)
    score_fn = exact_gaussian_score_fn(sde, mu, var)
    total = negative_elbo(score_fn, sde, x, eps, 5, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    parts = prior_term(sde, x) + diffusion_term(score_fn, sde, x, eps, 5, True, gen)
    parts = parts + offset_term(score_fn, sde, x, eps, gen)
    assert torch.allclose(total, parts)


def test_offset_term_against_its_closed_form_for_a_linear_score():
    """For s(y) = -y / c, x_eps = alpha x + std z and E||std s + z||^2 =
    D (1 - std^2 / c)^2 + std^2 alpha^2 ||x||^2 / c^2, so the offset's expectation is
    -D log alpha - D / 2 + E||std s + z||^2 / 2. At eps = 0.3 the volume term -D log alpha
    (about 1.4 here) and the score's error both matter."""
    sde, eps, c, dim, draws = VPSDE(), 0.3, 0.5, 3, 20000
    x = torch.tensor([[0.3, -0.7, 1.1], [0.0, 0.5, -0.2]], dtype=torch.float64)
    alpha, std = (float(v) for v in coefs(sde, eps))
    expected = (
        -dim * math.log(alpha)
        - dim / 2
        + 0.5 * (dim * (1 - std**2 / c) ** 2 + std**2 * alpha**2 * x.square().sum(1) / c**2)
    )
    samples = offset_term(
        lambda y, t: -y / c, sde, x.repeat(draws, 1), eps, torch.Generator().manual_seed(1)
    ).view(draws, 2)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(draws)
    assert (abs(mean - expected) < 4 * stderr).all()
    assert -dim * math.log(alpha) > 1.3 and (stderr < 0.01).all()


def test_gradient_with_respect_to_x_matches_finite_differences():
    """Same random draws on both sides: the estimate is a smooth function of x."""
    sde, eps = SubVPSDE(), 1e-2
    mu, var, x = gaussian_case(sde, 3, mean_scale=0.5, seed=2)
    score_fn = exact_gaussian_score_fn(sde, mu, var)

    def f(y):
        return negative_elbo(score_fn, sde, y, eps, 4, generator=torch.Generator().manual_seed(5))

    x = x[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x).sum(), x)
    h = 1e-6
    for i in range(3):
        step = torch.zeros_like(x)
        step[:, i] = h
        numeric = (f(x.detach() + step) - f(x.detach() - step)) / (2 * h)
        assert torch.allclose(grad[:, i], numeric, rtol=1e-5, atol=1e-5)
