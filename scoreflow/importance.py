"""Importance sampling of diffusion times for likelihood-weighted score matching.

With likelihood weighting lambda(t) = g(t)^2 the denoising score matching integrand is
g^2 ||s + z / std||^2 = (g^2 / std^2) ||std s + z||^2. Drawing t from

    p(t) = (g(t)^2 / std(t)^2) / Z   on [eps, T],   Z = int_eps^T g^2 / std^2 dt,

turns the likelihood-weighted loss into Z times the plain noise-prediction loss ||std s + z||^2,
with far lower variance. For the linear-beta SDEs the unnormalised CDF F(t) = int_eps^t g^2/std^2
has a closed form and so does its inverse, so t is sampled exactly by the inverse-CDF method:

    VP:    g^2 / std^2 = beta e^B / (e^B - 1),  F(t) = log(e^B(t) - 1) - log(e^B(eps) - 1)
    subVP: g^2 / std^2 = beta coth(B / 2),      F(t) = 2 log sinh(B(t)/2) - 2 log sinh(B(eps)/2)

(the subVP form equals the usual 2 log(e^B - 1) - B). Both are inverted for B, then B for t.
Everything is computed in float64, since F changes by ~20 nats between eps = 1e-5 and 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scoreflow.sde import SDE, VPSDE, SubVPSDE

__all__ = ["ImportanceSampler"]


def _log_expm1(b: Tensor) -> Tensor:
    """log(e^b - 1) for b > 0, accurate for small and large b."""
    return torch.where(b > 20, b + torch.log1p(-torch.exp(-b)), torch.log(torch.expm1(b)))


class ImportanceSampler:
    """The density p(t) proportional to g(t)^2 / std(t)^2 on [eps, T], its CDF and inverse.

    Only the VP and subVP SDEs are supported; for VE g^2/std^2 is constant, p(t) is uniform and
    importance sampling would change nothing, so it is rejected to avoid a misleading setting.
    """

    def __init__(self, sde: SDE, eps: float):
        if not isinstance(sde, (VPSDE, SubVPSDE)):
            raise NotImplementedError(
                "importance sampling of t is defined for the VP and subVP SDEs only: under the VE "
                "SDE g^2/std^2 is constant, so p(t) would be uniform"
            )
        if not 0 < eps < sde.T:
            raise ValueError(f"eps must lie in (0, T), got {eps}")
        self.sde = sde
        self.eps = float(eps)
        self._f_eps = float(self._raw_cdf(torch.tensor(self.eps, dtype=torch.float64)))
        f_end = float(self._raw_cdf(torch.tensor(sde.T, dtype=torch.float64)))
        self.normalizer = f_end - self._f_eps

    def _raw_cdf(self, t: Tensor) -> Tensor:
        b = self.sde.integrated_beta(t.to(torch.float64))
        if isinstance(self.sde, VPSDE):
            return _log_expm1(b)
        # 2 log(2 sinh(b/2)) = 2 log(e^b - 1) - b = b + 2 log(1 - e^{-b}), stable for all b > 0
        return b + 2 * torch.log(-torch.expm1(-b))

    def _raw_inverse(self, f: Tensor) -> Tensor:
        """B such that the raw CDF at B equals f."""
        if isinstance(self.sde, VPSDE):
            # log(e^B - 1) = f  =>  B = log(1 + e^f) = softplus(f)
            return torch.nn.functional.softplus(f)
        # 2 log(2 sinh(B/2)) = f  =>  B = 2 asinh(e^{f/2} / 2)
        return 2 * torch.asinh(0.5 * torch.exp(0.5 * f))

    def weight(self, t: Tensor) -> Tensor:
        """The unnormalised density g(t)^2 / std(t)^2, shape ``t.shape``."""
        _, std = self.sde.marginal_coefs(t)
        return self.sde.diffusion(t) ** 2 / std**2

    def density(self, t: Tensor) -> Tensor:
        """p(t) = g^2 / (std^2 Z) on [eps, T], shape ``t.shape``."""
        return self.weight(t) / self.normalizer

    def cdf(self, t: Tensor) -> Tensor:
        """P(T_sample <= t) = F(t) / Z, float64, shape ``t.shape``."""
        return (self._raw_cdf(t) - self._f_eps) / self.normalizer

    def inverse_cdf(self, u: Tensor) -> Tensor:
        """t with cdf(t) = u for u in [0, 1], float64, shape ``u.shape``."""
        f = u.to(torch.float64) * self.normalizer + self._f_eps
        t = self.sde.time_from_integrated_beta(self._raw_inverse(f))
        return t.clamp(self.eps, self.sde.T)

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw t ~ p(t) by inverting the CDF at uniform variates; shape ``shape``."""
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
        return self.inverse_cdf(u).to(dtype)
