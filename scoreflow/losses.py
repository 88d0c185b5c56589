"""Continuous-time denoising score matching (DSM) with the paper's three weightings.

For data x_0, a time t, noise z ~ N(0, I) and x_t = alpha(t) x_0 + std(t) z, the network's noise
function n(x_t, t) = std(t) s(x_t, t) (minus its predicted noise) gives the residual
r = n(x_t, t) + z = std (s + z / std). The per-example losses, for D data dimensions and the
reduction R (R(v) = mean(v) over dimensions, or 0.5 sum(v)), are

- ``"baseline"`` (lambda = std^2, t ~ U[eps, T]):        R(r^2) = R((std s + z)^2)
- ``"likelihood"`` (lambda = g^2, t ~ U[eps, T]):         R(r^2) g^2 / std^2 = R((s + z/std)^2) g^2
- ``"importance"`` (lambda = g^2, t ~ p(t) = g^2/(std^2 Z)):  R(r^2)

With likelihood weighting the expected loss is a bound on the negative log-likelihood (up to
constants and the [0, eps] part). Importance sampling draws t from the density p(t) of
:class:`scoreflow.importance.ImportanceSampler`, so that

    E_{t ~ p}[R(r^2)] = (1 / Z) int_eps^T (g^2 / std^2) E[R(r^2)] dt
                      = ((T - eps) / Z) E_{t ~ U[eps, T]}[R(r^2) g^2 / std^2],

i.e. the importance-sampled loss is the likelihood-weighted one divided by the constant
Z / (T - eps) (Z is ``ImportanceSampler.normalizer``, about 23.9 for VP with eps = 1e-5). The
constant changes neither the minimiser nor, up to scale, the gradients; like the reference we
leave it out of training and multiply by it only where a bound in nats is wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from scoreflow.importance import ImportanceSampler
from scoreflow.score import ScoreFn, get_noise_fn
from scoreflow.sde import SDE

__all__ = ["WEIGHTINGS", "Weighting", "weighting_name", "sample_times", "dsm_loss"]

Weighting = Literal["baseline", "likelihood", "importance"]
WEIGHTINGS: tuple[str, ...] = ("baseline", "likelihood", "importance")


def weighting_name(likelihood_weighting: bool, importance_weighting: bool) -> Weighting:
    """The weighting named by the reference's two flags.

    ``importance_weighting`` only has a meaning together with ``likelihood_weighting``.
    """
    if importance_weighting and not likelihood_weighting:
        raise ValueError("importance_weighting=True needs likelihood_weighting=True")
    if likelihood_weighting:
        return "importance" if importance_weighting else "likelihood"
    return "baseline"


def sample_times(
    sde: SDE,
    batch_size: int,
    weighting: Weighting,
    eps: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    importance_sampler: ImportanceSampler | None = None,
) -> Tensor:
    """Diffusion times for one batch, shape ``(batch_size,)``.

    t ~ U[eps, T] for the baseline and likelihood weightings; t ~ p(t) proportional to
    g^2 / std^2 on [eps, T] for ``"importance"`` (``importance_sampler`` may be passed to avoid
    rebuilding it; it must use the same ``eps``).
    """
    if weighting == "importance":
        sampler = importance_sampler or ImportanceSampler(sde, eps)
        if abs(sampler.eps - eps) > 1e-12 * max(1.0, eps):
            raise ValueError(f"importance sampler built for eps={sampler.eps}, loss uses {eps}")
        return sampler.sample((batch_size,), generator=generator, device=device, dtype=dtype)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    u = torch.rand((batch_size,), generator=generator, device=device, dtype=dtype)
    return u * (sde.T - eps) + eps


def dsm_loss(
    sde: SDE,
    model: nn.Module | ScoreFn,
    x0: Tensor,
    weighting: Weighting = "baseline",
    eps: float = 1e-5,
    reduce_mean: bool = True,
    generator: torch.Generator | None = None,
    importance_sampler: ImportanceSampler | None = None,
    t: Tensor | None = None,
    z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Denoising score matching loss of a batch ``x0`` (batch, C, H, W) in model space.

    ``model`` is either the score network (an ``nn.Module`` called as ``model(x, time_cond)``,
    turned into a noise function by :func:`scoreflow.score.get_noise_fn`) or directly a noise
    function ``(x_t, t) -> std(t) * s(x_t, t)``. t and z are drawn from ``generator`` on the
    device of ``x0``, unless given: ``t`` (batch,) and ``z`` (shaped like ``x0``) drawn by the
    caller (a distributed rank passes its slice of the global batch's draws).

    Returns ``(loss, losses)``: the batch mean (a scalar) and the per-example losses (batch,).
    See the module docstring for the three weightings and how their expectations relate.
    """
    noise_fn: Callable[[Tensor, Tensor], Tensor]
    noise_fn = get_noise_fn(sde, model) if isinstance(model, nn.Module) else model
    batch_size = x0.shape[0]

    # draw the time and the noise, then perturb the data
    if t is None:
        t = sample_times(
            sde, batch_size, weighting, eps, generator, x0.device, x0.dtype, importance_sampler
        )
    if z is None:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = sde.perturb(x0, t, z)

    # residual std * s + z of the noise prediction, reduced over the data dimensions
    residual = noise_fn(x_t, t) + z
    squared = residual.square().reshape(batch_size, -1)
    losses = squared.mean(dim=1) if reduce_mean else 0.5 * squared.sum(dim=1)

    if weighting == "likelihood":
        # ||s + z/std||^2 g^2 = ||std s + z||^2 g^2 / std^2
        std = sde.marginal_coefs(t)[1]
        losses = losses * sde.diffusion(t) ** 2 / std**2
    return losses.mean(), losses
