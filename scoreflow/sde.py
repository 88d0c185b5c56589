"""Forward stochastic differential equations of score-based diffusion models.

Every SDE here is linear in x, with T = 1:

    dx = f(t) x dt + g(t) dW,

so the transition kernel p_0t(x_t | x_0) is Gaussian with mean ``alpha(t) x_0`` and standard
deviation ``std(t)`` per dimension. The classes expose the drift, the diffusion, those marginal
coefficients, the prior at t = T and its log-density, and a one-step discretisation used by the
ancestral and reverse-diffusion samplers.

Small-t accuracy matters: the likelihood starts at t = eps = 1e-5, where the VP standard deviation
is about 1e-3 and the subVP one about 1e-6. All marginal quantities are therefore computed from
B(t) = int_0^t beta(s) ds with ``expm1`` rather than ``1 - exp``.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

__all__ = ["SDE", "LinearBetaSDE", "VPSDE", "SubVPSDE", "VESDE", "expand_like"]


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """``coef`` of shape ``(batch,)`` (or any prefix of ``x.shape``) with trailing singleton
    dimensions added, so that it broadcasts against ``x`` of shape ``(batch, ...)``."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class SDE(abc.ABC):
    """A linear forward SDE dx = f(t) x dt + g(t) dW on t in [0, T]."""

    T: float = 1.0

    @abc.abstractmethod
    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) such that the drift is f(t) x. Shape ``t.shape``."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), the diffusion coefficient. Shape ``t.shape``."""

    @abc.abstractmethod
    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), std(t)), shapes ``t.shape``: x_t = alpha(t) x_0 + std(t) z, z ~ N(0, I)."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior N(0, prior_std^2 I) at t = T."""

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t) = f(t) x for ``x`` of shape ``(batch, ...)`` and ``t`` of shape ``(batch,)``."""
        return expand_like(self.drift_coef(t), x) * x

    def drift_divergence(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact divergence of the drift, f(t) * D, shape ``(batch,)``."""
        dim = x[0].numel()
        return self.drift_coef(t) * dim

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``alpha(t) x`` (shape of ``x``) and std ``(batch,)`` of p_0t(x_t | x_0 = x)."""
        alpha, std = self.marginal_coefs(t)
        return expand_like(alpha, x) * x, std

    def perturb(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha(t) x + std(t) noise, shape of ``x``."""
        alpha, std = self.marginal_coefs(t)
        return expand_like(alpha, x) * x + expand_like(std, x) * noise

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Samples of the prior N(0, prior_std^2 I) with the given shape."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) per example, shape ``(batch,)``.

        log p(z) = -D/2 log(2 pi s^2) - ||z||^2 / (2 s^2).
        """
        dim = z[0].numel()
        var = self.prior_std**2
        sq = z.flatten(1).pow(2).sum(dim=1)
        return -0.5 * dim * math.log(2 * math.pi * var) - sq / (2 * var)

    def prior_entropy(self, dim: int) -> float:
        """Differential entropy of the prior in nats: D/2 log(2 pi e s^2)."""
        return 0.5 * dim * math.log(2 * math.pi * math.e * self.prior_std**2)

    def marginal_logp(self, x_t: Tensor, x_0: Tensor, t: Tensor) -> Tensor:
        """log p_0t(x_t | x_0) per example, shape ``(batch,)``."""
        mean, std = self.marginal_prob(x_0, t)
        dim = x_t[0].numel()
        var = std.to(torch.float64) ** 2
        sq = (x_t - mean).flatten(1).to(torch.float64).pow(2).sum(dim=1)
        logp = -0.5 * dim * torch.log(2 * math.pi * var) - sq / (2 * var)
        return logp.to(x_t.dtype)

    def discretize(self, x: Tensor, t: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
        """Euler-Maruyama step of the forward SDE over dt = T / num_steps.

        Returns ``(f, G)`` with x_{i+1} = x_i + f + G z: ``f = f(x, t) dt`` (shape of ``x``) and
        ``G = g(t) sqrt(dt)`` (shape ``(batch,)``). VP and VE override this with the exact
        discrete chains that their ancestral samplers use.
        """
        dt = self.T / num_steps
        return self.drift(x, t) * dt, self.diffusion(t) * math.sqrt(dt)


class LinearBetaSDE(SDE):
    """Base of the VP and subVP SDEs: the linear schedule beta(t) = b0 + t (b1 - b0), its
    integral B(t), and drift coefficient f(t) = -beta(t) / 2; prior N(0, I)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = b0 + t (b1 - b0)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta = b0 t + (b1 - b0) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def time_from_integrated_beta(self, b: Tensor) -> Tensor:
        """Inverse of B: the root t >= 0 of B(t) = b, in the cancellation-free form

        t = 2 b / (b0 + sqrt(b0^2 + 2 (b1 - b0) b)).
        """
        slope = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * slope * b))

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0


class VPSDE(LinearBetaSDE):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW.

    alpha(t) = exp(-B(t)/2), std(t) = sqrt(1 - exp(-B(t))), g(t)^2 = beta(t); prior N(0, I).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def discretize(self, x: Tensor, t: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
        """The DDPM chain x_{i+1} = sqrt(1 - b_i) x_i + sqrt(b_i) z with b_i = beta(t) / N.

        Returns ``(f, G)`` with ``f = (sqrt(1 - b_i) - 1) x`` and ``G = sqrt(b_i)``.
        """
        b = self.beta(t) / num_steps
        f = expand_like(torch.sqrt(1.0 - b) - 1.0, x) * x
        return f, torch.sqrt(b)


class SubVPSDE(LinearBetaSDE):
    """Sub-variance-preserving SDE: dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B))) dW.

    alpha(t) = exp(-B/2), std(t) = 1 - exp(-B) (no square root), g^2 = beta (1 - exp(-2B));
    prior N(0, I).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        b = self.integrated_beta(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * b))

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)


class VESDE(SDE):
    """Variance-exploding SDE: dx = sqrt(d sigma^2 / dt) dW, sigma(t) = smin (smax / smin)^t.

    alpha(t) = 1, std(t) = sigma(t), g(t) = sigma(t) sqrt(2 log(smax / smin));
    prior N(0, smax^2 I). (The tiny variance smin^2 at t = 0 is ignored, as is customary.)
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = smin (smax / smin)^t."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def marginal_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.sigma(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def discretize(self, x: Tensor, t: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
        """The SMLD chain on N geometric noise levels: x_{i+1} = x_i + sqrt(s_i^2 - s_{i-1}^2) z.

        Returns ``(0, sqrt(sigma(t)^2 - sigma(t - T/N)^2))``, with sigma(t - T/N) taken as 0 on
        the first step.
        """
        sigma = self.sigma(t)
        prev_t = t - self.T / num_steps
        prev = torch.where(prev_t > 0, self.sigma(prev_t.clamp(min=0)), torch.zeros_like(t))
        return torch.zeros_like(x), torch.sqrt(sigma**2 - prev**2)
