"""Turn a score network into a score function s(x, t) ~ grad_x log p_t(x).

This is the one place where the network's conditioning and output conventions meet the SDE:

- VP and subVP: the network is conditioned on 999 t (the positional embedding of DDPM++ was
  designed for integer steps 0..999) and predicts the noise eps_hat of x_t = alpha x_0 + std z;
  the score is then -eps_hat / std(t).
- VE: the network is conditioned on sigma(t) (its Fourier embedding takes log sigma) and, with
  ``scale_by_sigma``, already returns the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scoreflow.sde import SDE, VESDE, expand_like

ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "ScoreFn",
    "get_noise_fn",
    "get_score_fn",
    "time_condition",
    "exact_gaussian_score_fn",
    "exact_gaussian_flow_logp",
    "no_grad_score",
]


def time_condition(sde: SDE, t: Tensor) -> Tensor:
    """The network's conditioning input for times ``t`` (batch,): 999 t, or sigma(t) for VE."""
    if isinstance(sde, VESDE):
        return sde.marginal_coefs(t)[1]
    return t * 999


def get_noise_fn(sde: SDE, model: nn.Module) -> ScoreFn:
    """(x, t) -> std(t) * score, i.e. minus the predicted noise, shape of ``x``.

    For VP/subVP this is the raw network output negated; it is the natural quantity of the
    denoising losses, where ``std * score + z`` is the residual.
    """

    def noise_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, time_condition(sde, t))
        if isinstance(sde, VESDE):
            return out * expand_like(sde.marginal_coefs(t)[1], x)
        return -out

    return noise_fn


def get_score_fn(sde: SDE, model: nn.Module) -> ScoreFn:
    """(x, t) -> s(x, t), the model's score at ``x`` (batch, ...) and ``t`` (batch,).

    The module's train/eval mode is left as the caller set it (dropout is active in training).
    """

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, time_condition(sde, t))
        if isinstance(sde, VESDE):
            return out
        std = sde.marginal_coefs(t)[1]
        return -out / expand_like(std, x)

    return score_fn


def exact_gaussian_score_fn(sde: SDE, mean: Tensor, var: Tensor) -> ScoreFn:
    """Score of p_t when the data are N(mean, diag(var)): a closed form used in tests.

    p_t = N(alpha mean, alpha^2 var + std^2), so s(x, t) = -(x - alpha mean) / (alpha^2 var
    + std^2).
    ``mean`` and ``var`` have the shape of one example.
    """

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        alpha, std = sde.marginal_coefs(t)
        a, s = expand_like(alpha, x), expand_like(std, x)
        return -(x - a * mean) / (a * a * var + s * s)

    return score_fn


def exact_gaussian_flow_logp(sde: SDE, mean: Tensor, var: Tensor, x: Tensor, eps: float) -> Tensor:
    """Log-density at ``x`` (batch, D) of the probability-flow model of N(mean, diag(var)) data
    with the exact score (:func:`exact_gaussian_score_fn`), started at time ``eps``: shape (batch,).

    The marginals stay Gaussian, N(alpha_t mean, alpha_t^2 var + std_t^2), and the flow keeps
    (x - mean_t) / sd_t fixed, so the flow takes x to z = mean_T + (x - mean_eps) sd_T / sd_eps
    and log p(x) = log prior(z) + log p_eps(x) - log p_T(z). ``mean`` and ``var`` are (D,).
    """
    times = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    alpha, std = sde.marginal_coefs(times)
    var_eps, var_end = alpha[0] ** 2 * var + std[0] ** 2, alpha[1] ** 2 * var + std[1] ** 2
    z = alpha[1] * mean + (x - alpha[0] * mean) * torch.sqrt(var_end / var_eps)

    def log_normal(y: Tensor, mu: Tensor, variance: Tensor) -> Tensor:
        return (-0.5 * ((y - mu) ** 2 / variance + torch.log(2 * math.pi * variance))).sum(-1)

    log_p_eps = log_normal(x, alpha[0] * mean, var_eps)
    return sde.prior_logp(z) + log_p_eps - log_normal(z, alpha[1] * mean, var_end)


def no_grad_score(score_fn: ScoreFn) -> ScoreFn:
    """Wrap a score function so that it runs under ``torch.no_grad``."""

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return score_fn(x, t)

    return wrapped
