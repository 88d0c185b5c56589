"""Samplers of score-based diffusion models: the probability-flow ODE and predictor-corrector.

Both start from the prior x_T ~ N(0, prior_std^2 I) and run the reverse process down to the
smallest time ``eps`` (sampling.smallest_time), given a score function s(x, t) ~ grad log p_t(x)
(see :func:`scoreflow.score.get_score_fn`). They return samples in the model's space (apply the
data's inverse scaler afterwards) and the number of score evaluations (NFE).

Probability-flow ODE (deterministic):

    dx/dt = f(x, t) - g(t)^2 s(x, t) / 2,

integrated from t = T to t = eps by an adaptive Dormand-Prince 5(4) solver (torchdiffeq's
``dopri5``, the method of scipy's RK45), with tolerances rtol = atol = 1e-5 by default.

Predictor-corrector (stochastic), on the grid t_i = T - i h, i = 0 .. N-1, h = (T - eps)/(N - 1):
at every t_i first ``n_steps_each`` corrector steps, then one predictor step of length h:

- Euler-Maruyama predictor on the reverse SDE dx = [f - g^2 s] dt + g dW-bar:
  x <- x - [f(x, t) - g^2 s] h + g sqrt(h) z.
- Reverse-diffusion predictor: with the forward step x_{i+1} = x_i + F + G z of
  ``sde.discretize``, x <- x - F + G^2 s + G z.
- Ancestral predictor: DDPM's for VP (b = beta(t) h):
  x <- (x + b s) / sqrt(1 - b) + sqrt(b) z; SMLD's for VE (sigma_prev = sigma(t - h)):
  x <- x + (sigma^2 - sigma_prev^2) s + sqrt(sigma_prev^2 (sigma^2 - sigma_prev^2) / sigma^2) z.
- Langevin corrector with the signal-to-noise rule of the score-SDE paper:
  step = 2 a (snr ||z|| / ||s||)^2 with the norms averaged over the batch and a = exp(-beta(t) h)
  for VP/subVP (1 for VE); x <- x + step s + sqrt(2 step) z.

Denoising (sampling.noise_removal): both samplers end at t = eps with Tweedie's formula, the
posterior mean of the clean data given x_eps,

    x_0 = E[x_0 | x_eps] = (x + std(eps)^2 s(x, eps)) / alpha(eps),

with (alpha, std) of ``sde.marginal_coefs`` (for VE, alpha = 1 and x_0 = x + sigma(eps)^2 s). In
the PC sampler it takes the place of the last predictor step, at t = eps; the ODE sampler adds it
after the solve. The score-SDE reference code instead returns the noise-free mean of one
discretised reverse-diffusion step (ODE: of length eps; PC: the last predictor step, of length h).
That step agrees with Tweedie's formula only to first order, and its size depends on the
discretisation: for subVP at eps = 1e-2, a step of length eps moves x 1.5 to 3 times as far
(drift term beta(eps) eps / 2 against B(eps) / 2, score term g(eps)^2 eps against std(eps)^2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from scoreflow.sde import SDE, VESDE, VPSDE, LinearBetaSDE, expand_like

ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "PREDICTORS",
    "CORRECTORS",
    "reverse_drift",
    "tweedie_denoise",
    "ode_sample",
    "pc_sample",
    "check_pc_settings",
    "predictor_step",
    "langevin_step",
]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "none")

logger = logging.getLogger(__name__)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (any device)."""
    if generator is not None and generator.device.type != x.device.type:
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        return z.to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _initial_state(
    sde: SDE,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    prior_sample: Tensor | None,
) -> Tensor:
    """x_T: ``prior_sample`` if given, else a prior draw from ``generator`` on ``device``
    (default: the generator's device; a generator on another device draws there first)."""
    if prior_sample is not None:
        return prior_sample.to(device=device or prior_sample.device, dtype=dtype)
    if device is None:
        device = generator.device if generator is not None else None
    device = torch.device(device) if device is not None else None
    if generator is not None and device is not None and generator.device.type != device.type:
        x = sde.prior_sampling(shape, generator=generator, device=generator.device, dtype=dtype)
        return x.to(device)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


def reverse_drift(
    sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, probability_flow: bool = False
) -> Tensor:
    """Drift of the reverse-time process at ``x`` (batch, ...) and ``t`` (batch,).

    Reverse SDE: f(x, t) - g(t)^2 s(x, t); probability-flow ODE: f(x, t) - g(t)^2 s(x, t) / 2.
    """
    g2 = sde.diffusion(t) ** 2
    if probability_flow:
        g2 = 0.5 * g2
    return sde.drift(x, t) - expand_like(g2, x) * score_fn(x, t)


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: Tensor, eps: float) -> Tensor:
    """E[x_0 | x_eps = x] by Tweedie's formula: (x + std(eps)^2 s(x, eps)) / alpha(eps).

    ``x`` is (batch, ...) at time ``eps``; returns a tensor of the same shape (one score
    evaluation). Exact for the true score: the forward kernel is N(alpha x_0, std^2 I).
    """
    t = torch.full((x.shape[0],), eps, device=x.device, dtype=x.dtype)
    alpha, std = sde.marginal_coefs(t)
    return (x + expand_like(std**2, x) * score_fn(x, t)) / expand_like(alpha, x)


@torch.no_grad()
def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    eps: float = 1e-3,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    denoise: bool = True,
    dtype: torch.dtype = torch.float32,
    prior_sample: Tensor | None = None,
    method: str = "dopri5",
) -> tuple[Tensor, int]:
    """Samples by integrating the probability-flow ODE from T down to ``eps``.

    dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 with an adaptive solver (``method``, default dopri5) at
    tolerances ``rtol``/``atol``; the whole batch shares one step-size sequence, as in the
    reference's solve of the flattened batch.

    Args:
        score_fn: (x, t) -> s(x, t), shapes (batch, ...) and (batch,).
        sde: the forward SDE.
        shape: ``(batch, ...)`` of the samples.
        eps: the smallest time (sampling.smallest_time).
        generator: random source of the prior sample.
        device: where to sample (default: the generator's or the default device).
        denoise: end with Tweedie's formula x_0 = (x + std(eps)^2 s) / alpha(eps) (see the
            module docstring for how this differs from the reference).
        prior_sample: x_T to start from instead of a fresh prior draw (shape ``shape``).

    Returns:
        ``(x, nfe)``: samples of shape ``shape`` in model space and the number of score
        evaluations (solver evaluations plus one for denoising).
    """
    from torchdiffeq import odeint

    x_T = _initial_state(sde, shape, generator, device, dtype, prior_sample)
    batch = x_T.shape[0]
    evaluations = [0]

    def ode_func(t: Tensor, x: Tensor) -> Tensor:
        evaluations[0] += 1
        vec_t = t.to(x.dtype).expand(batch)
        return reverse_drift(sde, score_fn, x, vec_t, probability_flow=True)

    times = torch.tensor([sde.T, eps], device=x_T.device, dtype=x_T.dtype)
    # step_t makes the solver land on eps instead of stepping past it and interpolating: the
    # marginals are undefined for t < 0, where an overshooting step would evaluate the score.
    options = {"step_t": times} if method in ("dopri5", "dopri8", "bosh3", "adaptive_heun") else {}
    x = odeint(ode_func, x_T, times, rtol=rtol, atol=atol, method=method, options=options)[-1]
    nfe = evaluations[0]

    if denoise:
        x = tweedie_denoise(sde, score_fn, x, eps)
        nfe += 1
    return x, nfe


def predictor_step(
    predictor: str,
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: Tensor,
    step: float,
    generator: torch.Generator | None,
    probability_flow: bool = False,
    to_zero: bool = False,
) -> tuple[Tensor, Tensor]:
    """One predictor move from time ``t`` (batch,) to t - ``step``.

    Returns ``(x_next, x_mean)``, both shaped like ``x``: the new state and its noise-free mean.
    The formulas are in the module docstring. ``probability_flow`` makes Euler-Maruyama and
    reverse diffusion follow the probability-flow ODE (no noise; half the score term).
    ``to_zero`` marks a step that ends at (or below) t = 0: the VE chain's previous noise level
    is then exactly 0, so its mean is Tweedie's x + sigma(t)^2 s.
    """
    if predictor == "none":
        return x, x
    if predictor == "euler_maruyama":
        x_mean = x - reverse_drift(sde, score_fn, x, t, probability_flow) * step
        if probability_flow:
            return x_mean, x_mean
        g = expand_like(sde.diffusion(t), x)
        return x_mean + g * step**0.5 * _randn_like(x, generator), x_mean
    if predictor == "reverse_diffusion":
        forward_f, forward_g = _forward_step(sde, x, t, step, to_zero)
        g2 = expand_like(forward_g**2, x)
        if probability_flow:
            x_mean = x - forward_f + 0.5 * g2 * score_fn(x, t)
            return x_mean, x_mean
        x_mean = x - forward_f + g2 * score_fn(x, t)
        return x_mean + g2.sqrt() * _randn_like(x, generator), x_mean
    if predictor == "ancestral":
        return _ancestral_step(sde, score_fn, x, t, step, generator, probability_flow, to_zero)
    raise ValueError(f"unknown predictor {predictor!r}: choose one of {', '.join(PREDICTORS)}")


def _forward_step(
    sde: SDE, x: Tensor, t: Tensor, step: float, to_zero: bool
) -> tuple[Tensor, Tensor]:
    """(F, G) of the forward chain's step from t - ``step`` to t (``sde.discretize``).

    With ``to_zero`` the step starts at time 0: for VE the previous noise level is then 0, so
    G = sigma(t) exactly (discretize would see t - step as a round-off above 0).
    """
    if to_zero and isinstance(sde, VESDE):
        return torch.zeros_like(x), sde.marginal_coefs(t)[1]
    return sde.discretize(x, t, sde.T / step)


def _ancestral_step(
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: Tensor,
    step: float,
    generator: torch.Generator | None,
    probability_flow: bool,
    to_zero: bool,
) -> tuple[Tensor, Tensor]:
    """DDPM (VP) or SMLD (VE) ancestral step; see the module docstring."""
    _check_ancestral(sde, probability_flow)
    if isinstance(sde, VPSDE):
        b = expand_like(_forward_step(sde, x, t, step, to_zero)[1] ** 2, x)
        x_mean = (x + b * score_fn(x, t)) / torch.sqrt(1.0 - b)
        return x_mean + b.sqrt() * _randn_like(x, generator), x_mean
    if isinstance(sde, VESDE):
        sigma2 = expand_like(sde.marginal_coefs(t)[1] ** 2, x)
        jump2 = expand_like(_forward_step(sde, x, t, step, to_zero)[1] ** 2, x)
        prev2 = (sigma2 - jump2).clamp(min=0.0)
        x_mean = x + jump2 * score_fn(x, t)
        std = torch.sqrt(prev2 * jump2 / sigma2)
        return x_mean + std * _randn_like(x, generator), x_mean
    raise AssertionError("unreachable: _check_ancestral accepts VP and VE only")


def langevin_step(
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: Tensor,
    snr: float,
    step: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One Langevin corrector move at time ``t`` (batch,); returns ``(x_next, x_mean)``.

    step size e = 2 a (snr * mean ||z|| / mean ||s||)^2, the means over the batch, with
    a = exp(-beta(t) h) for VP/subVP and a = 1 for VE; x_mean = x + e s,
    x_next = x_mean + sqrt(2 e) z. The reference uses the DDPM alpha 1 - beta(t) h, equal to
    first order in h (relative difference 2e-4 at 1000 steps); the exponential stays positive
    on coarse grids.
    """
    grad = score_fn(x, t)
    noise = _randn_like(x, generator)
    grad_norm = grad.flatten(1).norm(dim=1).mean()
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    if isinstance(sde, LinearBetaSDE):
        alpha = torch.exp(-sde.beta(t) * step)
    else:
        alpha = torch.ones_like(t)
    step_size = expand_like(2.0 * alpha * (snr * noise_norm / grad_norm) ** 2, x)
    x_mean = x + step_size * grad
    return x_mean + torch.sqrt(2.0 * step_size) * noise, x_mean


def check_pc_settings(
    sde: SDE,
    predictor: str,
    corrector: str,
    num_steps: int,
    eps: float,
    n_steps_each: int = 1,
    probability_flow: bool = False,
) -> None:
    """Raise ValueError (NotImplementedError for a combination that has no sampler) unless
    :func:`pc_sample` can run with these settings; so that a driver can check them before it
    starts a long run."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}: choose one of {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}: choose one of {', '.join(CORRECTORS)}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    if corrector != "none" and n_steps_each < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"the smallest time eps must lie in (0, T), got {eps}")
    step = (sde.T - eps) / (num_steps - 1)
    if (
        isinstance(sde, VPSDE)
        and predictor in ("reverse_diffusion", "ancestral")
        and sde.beta_max * step >= 1.0
    ):
        raise ValueError(
            f"the DDPM chain of the {predictor} predictor needs beta_max * h < 1, i.e. "
            f"num_steps > {1 + (sde.T - eps) * sde.beta_max:.0f}; got num_steps={num_steps}"
        )
    if predictor == "ancestral":
        _check_ancestral(sde, probability_flow)


def _check_ancestral(sde: SDE, probability_flow: bool) -> None:
    if probability_flow:
        raise NotImplementedError(
            "the ancestral predictor samples the discrete Markov chain and has no "
            "probability-flow form: use euler_maruyama or reverse_diffusion"
        )
    if not isinstance(sde, (VPSDE, VESDE)):
        raise NotImplementedError(
            f"the ancestral predictor is defined for the VP (DDPM) and VE (SMLD) chains, not "
            f"for {type(sde).__name__}: use reverse_diffusion or euler_maruyama"
        )


@torch.no_grad()
def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    num_steps: int = 1000,
    n_steps_each: int = 1,
    eps: float = 1e-3,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    probability_flow: bool = False,
    prior_sample: Tensor | None = None,
    show_progress: bool = False,
) -> tuple[Tensor, int]:
    """Predictor-corrector samples on the grid t_i = linspace(T, eps, num_steps).

    At each t_i: ``n_steps_each`` corrector steps (``corrector``: langevin | none), then one
    predictor step of length h = (T - eps) / (num_steps - 1) (``predictor``: euler_maruyama |
    reverse_diffusion | ancestral | none). With ``denoise`` the predictor step at the last time,
    t = eps, is replaced by Tweedie's formula x_0 = (x + std(eps)^2 s) / alpha(eps) (one score
    evaluation, like the step it replaces); the reference returns that predictor step's
    noise-free mean, a discretised, first-order version of the same move (for subVP with
    eps > h it even stops at t = eps - h). Without ``denoise`` the last predictor step is taken
    with its noise.

    Returns:
        ``(x, nfe)``: samples of shape ``shape`` in model space and the number of score
        evaluations (one per predictor step or final denoising, ``n_steps_each`` per corrector
        visit).
    """
    check_pc_settings(sde, predictor, corrector, num_steps, eps, n_steps_each, probability_flow)
    step = (sde.T - eps) / (num_steps - 1)

    x = _initial_state(sde, shape, generator, device, dtype, prior_sample)
    times = torch.linspace(sde.T, eps, num_steps, device=x.device, dtype=torch.float64)
    nfe = 0

    steps = range(num_steps)
    if show_progress:
        from scoreflow.records import progress

        steps = progress(steps, desc="PC sampling", leave=False)
    # The last step, at t = eps, reaches t = 0 when h >= eps (up to round-off).
    last_to_zero = eps <= step * (1 + 1e-6)
    for i in steps:
        t = times[i].to(x.dtype).expand(x.shape[0])
        if corrector == "langevin":
            for _ in range(n_steps_each):
                x, _ = langevin_step(sde, score_fn, x, t, snr, step, generator)
                nfe += 1
        last = i == num_steps - 1
        if last and denoise:
            x = tweedie_denoise(sde, score_fn, x, eps)
            nfe += 1
        else:
            to_zero = last and last_to_zero
            x, _ = predictor_step(
                predictor, sde, score_fn, x, t, step, generator, probability_flow, to_zero
            )
            nfe += 0 if predictor == "none" else 1
    return x, nfe
