"""Dequantisation: from 8-bit images to continuous data in [0, 1), with log q(u | x).

A continuous density p on [0, 1)^D assigns the 8-bit image x (integers 0..255) the probability
P(x) = int_{[0,1)^D} p((x + u) / 256) 256^-D du. For any density q(u | x) on the unit cube,
Jensen's inequality gives

    log P(x) >= E_{u ~ q}[log p((x + u) / 256) - D log 256 - log q(u | x)],

so -log P(x) is bounded by the continuous negative log-likelihood of y = (x + u) / 256 (plus
the 8 bits per dimension of the 256-level grid, see :func:`scoreflow.likelihood.bpd_offset`)
plus E_q[log q(u | x)]. Uniform dequantisation takes q = U[0, 1)^D, log q = 0; variational
dequantisation learns q with a flow, which tightens the bound.

Every dequantiser here has ``dequantize(x_uint8, generator) -> (y, log_q)`` with y (B, C, H, W)
in [0, 1) and log_q (B,) in nats. ``generator`` is one torch.Generator, or one per example (on the
images' device) for values that depend on that example only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scoreflow.likelihood import Generator, rand, randn

__all__ = ["UniformDequantizer", "VariationalDequantizer"]

NUM_LEVELS = 256


def _to_float(x_uint8: Tensor, dtype: torch.dtype) -> Tensor:
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"dequantize wants uint8 images, got {x_uint8.dtype}")
    return x_uint8.to(dtype)


class UniformDequantizer:
    """y = (x + u) / 256 with u ~ U[0, 1)^D; log q(u | x) = 0."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def dequantize(self, x_uint8: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """(y (B, C, H, W) in [0, 1), log_q (B,) = 0) for uint8 images ``x_uint8`` (B, C, H, W)."""
        x = _to_float(x_uint8, self.dtype)
        u = rand(x.shape, generator, x.device, self.dtype)
        y = (x + u) / NUM_LEVELS
        return y, torch.zeros(x.shape[0], device=x.device, dtype=self.dtype)


class VariationalDequantizer:
    """y = (x + u) / 256 with u from a conditional flow q(u | x).

    ``flow`` is a module with ``forward(x01, noise) -> (u, log_q)``: ``x01`` the image scaled to
    [0, 1] (x / 255), ``noise`` standard normal of the image's shape, ``u`` in (0, 1)^D and
    ``log_q`` (B,) = log q(u | x) in nats, the Gaussian base density included (as
    :class:`scoreflow.nets.flowpp.FlowppDequantizer` does). Gradients flow to the flow's
    parameters when enabled, so the dequantiser trainer can use this class too.
    """

    def __init__(self, flow: nn.Module, dtype: torch.dtype = torch.float32):
        self.flow = flow
        self.dtype = dtype

    def dequantize(self, x_uint8: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """(y (B, C, H, W) in [0, 1), log_q (B,)) for uint8 images ``x_uint8`` (B, C, H, W)."""
        x = _to_float(x_uint8, self.dtype)
        noise = randn(x.shape, generator, x.device, self.dtype)
        u, log_q = self.flow(x / (NUM_LEVELS - 1), noise)
        y = (x + u) / NUM_LEVELS
        return y, log_q
