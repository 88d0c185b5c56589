"""Flow++ variational dequantiser: a conditional flow q(u | x) on the unit cube.

Variational dequantisation replaces the uniform noise u ~ U[0, 1)^D of ``y = (x_int + u) / 256``
by a learned density q(u | x). The flow maps Gaussian noise e ~ N(0, I) (shape of the image) to
u in (0, 1)^D, conditioned on the image x in [0, 1]:

    e --checkerboard split--> (a, b)
      --[actnorm, invertible 1x1, mixture-of-logistics attention coupling, swap] x num_blocks-->
      --merge--> h --sigmoid--> u,

    log q(u | x) = log N(e; 0, I) - sum over layers of log |det d layer / d input|.

The split is the reference's "checkerboard": the even and odd columns of the image, each a
(C, H, W / 2) half, so the image width must be even (28 and 8 are; other sizes raise). Each
coupling transforms one half elementwise,

    h -> exp(s) * logit(F(h)) + t,   F = CDF of a K-component mixture of logistics,

with s = tanh(.), t, and the mixture's logits, means and log-scales (log-scales floored at -7)
predicted by a network of the other half and of a context: gated residual convolutions
(concat-ELU, gate a * sigmoid(b)) fed with the context, layer norm, gated multi-head
self-attention with a learned position embedding, layer norm. The context is a small
convolutional network (``cifar10``, ``small``) or a deeper one with attention (``imagenet32``) on
the checkerboard-split image x - 1/2. Every log-determinant is exact (a closed form per layer);
the mixture CDF and its logit are computed in log space, so no clipping enters them.

Weight initialisation is data dependent, as in Flow++: on the first batch every actnorm layer
sets its per-element scale and bias so that its outputs have zero mean and unit variance over the
batch, and every convolution / dense layer rescales its random weights so that its outputs
are standardised (times ``init_scale``). The buffer ``initialized`` records that this happened
and is saved with the weights, so a resumed run does not redo it.

Two architectures of the paper's reference are reproduced: ``cifar10`` (4 flow blocks, each with
an invertible 1x1 convolution, 96 filters, 2 conv/attention blocks per coupling, 32 components,
4 heads, context of 3 gated convolutions: about 3.47M parameters at 3x32x32) and ``imagenet32``
(8 flow blocks without 1x1 convolutions, 128 filters, 8 conv/attention blocks per coupling,
weight-normalised convolutions, context of 8 gated residual and attention blocks: about 35.48M
parameters). ``small`` is the ``cifar10`` layout with free widths, for CPU tests and demos.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "FlowppDequantizer",
    "CheckerboardSplit",
    "ActNorm",
    "Invertible1x1",
    "MixLogisticAttnCoupling",
    "TupleFlip",
    "Sigmoid",
    "mixlogistic_logcdf",
    "mixlogistic_logpdf",
]

ARCHS = ("cifar10", "imagenet32", "small")
MIN_LOGSCALE = -7.0
Pair = tuple[Tensor, Tensor]


def _sum_per_example(x: Tensor) -> Tensor:
    """Sum over all but the first dimension: (batch, ...) -> (batch,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Layers with data-dependent initialisation


class _DataInit(nn.Module):
    """A layer that standardises its outputs on the first batch it sees in ``data_init`` mode."""

    data_init: bool = False


class Conv2d(_DataInit):
    """Convolution (``same`` padding) with Flow++'s data-dependent init: W (O, I, k, k), b (O,).

    On initialisation, weights drawn from N(0, 0.05^2) are rescaled per output channel by
    ``init_scale / sqrt(var + 1e-6)`` and the bias set to ``-mean * scale``, mean and variance of
    the outputs over (batch, H, W). A 1x1 kernel is the reference's dense "nin" layer.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, init_scale: float = 1.0
    ):
        super().__init__()
        self.init_scale = init_scale
        self.W = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.05
        )
        self.b = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.data_init:
            with torch.no_grad():
                y = F.conv2d(x, self.W, padding="same")
                mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
                scale = self.init_scale * torch.rsqrt(var + 1e-6)
                self.W.mul_(scale[:, None, None, None])
                self.b.copy_(-mean * scale)
        return F.conv2d(x, self.W, self.b, padding="same")


class WeightNormConv2d(_DataInit):
    """Weight-normalised convolution W = g V / ||V|| (norm per output channel), plus bias b.

    Data-dependent init sets g = init_scale / std and b = -mean g of the outputs of V / ||V||.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, init_scale: float = 1.0
    ):
        super().__init__()
        self.init_scale = init_scale
        self.V = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.05
        )
        self.g = nn.Parameter(torch.ones(out_channels))
        self.b = nn.Parameter(torch.zeros(out_channels))

    def weight(self) -> Tensor:
        norm = self.V.square().sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12).rsqrt()
        return self.g[:, None, None, None] * self.V * norm

    def forward(self, x: Tensor) -> Tensor:
        if self.data_init:
            with torch.no_grad():
                self.g.fill_(1.0)
                y = F.conv2d(x, self.weight(), padding="same")
                mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
                scale = self.init_scale * torch.rsqrt(var + 1e-6)
                self.g.copy_(scale)
                self.b.copy_(-mean * scale)
        return F.conv2d(x, self.weight(), self.b, padding="same")


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of (batch, C, H, W), scale g (C,) and bias b (C,)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(channels))
        self.b = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.g[:, None, None] + self.b[
            :, None, None
        ]


def concat_elu(x: Tensor) -> Tensor:
    """ELU of [x, -x] along channels: (batch, C, H, W) -> (batch, 2C, H, W)."""
    return F.elu(torch.cat([x, -x], dim=1))


def gate(x: Tensor) -> Tensor:
    """Split channels in halves a, b and return a * sigmoid(b)."""
    a, b = x.chunk(2, dim=1)
    return a * torch.sigmoid(b)


class GatedConv(nn.Module):
    """Gated residual block: x + gate(c2(dropout(celu(c1(celu(x)) + a_proj(celu(a)))))).

    ``c1`` is a 3x3 convolution to ``channels``, ``a_proj`` (only with an auxiliary input of
    ``aux_channels``) a 1x1 one, ``c2`` a 1x1 (``use_nin``) or 3x3 convolution to 2 ``channels``
    with init scale 0.1.
    """

    def __init__(
        self,
        channels: int,
        aux_channels: int,
        use_nin: bool,
        dropout: float,
        conv: type[nn.Module] = Conv2d,
    ):
        super().__init__()
        self.c1 = conv(2 * channels, channels, 3)
        if aux_channels:
            self.a_proj = Conv2d(2 * aux_channels, channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.c2 = (Conv2d if use_nin else conv)(
            2 * channels, 2 * channels, 1 if use_nin else 3, init_scale=0.1
        )

    def forward(self, x: Tensor, aux: Tensor | None = None) -> Tensor:
        c1 = self.c1(concat_elu(x))
        if aux is not None:
            c1 = c1 + self.a_proj(concat_elu(aux))
        c1 = self.dropout(concat_elu(c1))
        return x + gate(self.c2(c1))


class GatedAttention(nn.Module):
    """Gated multi-head self-attention over all positions, with a position embedding.

    q, k, v = proj1(x + pos_emb) split as (3, heads, C / heads) along channels; the heads'
    softmax(q k^T / sqrt(C / heads)) v are merged and the output is x + gate(proj2(dropout(.))).
    """

    def __init__(self, channels: int, heads: int, dropout: float):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.heads = heads
        self.proj1 = Conv2d(channels, 3 * channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.proj2 = Conv2d(channels, 2 * channels, 1, init_scale=0.1)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        dim = channels // self.heads
        qkv = self.proj1(x + pos_emb[None]).reshape(batch, 3, self.heads, dim, height * width)
        q, k, v = qkv.unbind(dim=1)  # (batch, heads, dim, positions) each
        attn = torch.softmax(torch.einsum("bhdT,bhdt->bhTt", q, k) / math.sqrt(dim), dim=-1)
        out = torch.einsum("bhTt,bhdt->bhdT", attn, v).reshape(batch, channels, height, width)
        return x + gate(self.proj2(self.dropout(out)))


# ----------------------------------------------------------------------------------------------
# Mixture of logistics


def _mixture_terms(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor):
    """log mixture weights and standardised z = (x - mean) / scale, shapes (..., K)."""
    z = (x.unsqueeze(-1) - means) * torch.exp(-logscales)
    return torch.log_softmax(logits, dim=-1), z


def mixlogistic_logcdf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    """log F(x) of a mixture of logistics; x (...), parameters (..., K). Returns (...)."""
    logw, z = _mixture_terms(x, logits, means, logscales)
    return torch.logsumexp(logw + F.logsigmoid(z), dim=-1)


def mixlogistic_logsf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    """log (1 - F(x)) of a mixture of logistics, computed without cancellation."""
    logw, z = _mixture_terms(x, logits, means, logscales)
    return torch.logsumexp(logw + F.logsigmoid(-z), dim=-1)


def mixlogistic_logpdf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    """log density of a mixture of logistics: logsumexp_k [log w_k + z - s_k - 2 softplus(z)]."""
    logw, z = _mixture_terms(x, logits, means, logscales)
    return torch.logsumexp(logw - logscales + F.logsigmoid(z) + F.logsigmoid(-z), dim=-1)


def _mixlogistic_logit_cdf(x, logits, means, logscales) -> tuple[Tensor, Tensor]:
    """logit(F(x)) and log of its derivative, pdf / (F (1 - F)), elementwise."""
    logcdf = mixlogistic_logcdf(x, logits, means, logscales)
    logsf = mixlogistic_logsf(x, logits, means, logscales)
    logpdf = mixlogistic_logpdf(x, logits, means, logscales)
    return logcdf - logsf, logpdf - logcdf - logsf


def _mixlogistic_inverse_logit_cdf(y, logits, means, logscales, iters: int = 100) -> Tensor:
    """x with logit(F(x)) = y, by bisection on [min(mean - 200 S), max(mean + 200 S)], S the sum
    of the component scales (the reference's bracket)."""
    spread = 200.0 * torch.exp(logscales).sum(dim=-1, keepdim=True)
    low = (means - spread).min(dim=-1).values
    high = (means + spread).max(dim=-1).values
    for _ in range(iters):
        mid = (low + high) / 2
        above = _mixlogistic_logit_cdf(mid, logits, means, logscales)[0] > y
        high = torch.where(above, mid, high)
        low = torch.where(above, low, mid)
    return (low + high) / 2


# ----------------------------------------------------------------------------------------------
# Flow layers: forward(h, context) -> (h', log|det dh'/dh|), inverse(h', context) -> (h, log|det|)


class CheckerboardSplit(nn.Module):
    """(batch, C, H, W) -> (even columns, odd columns), each (batch, C, H, W / 2); volume kept."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        return (x[..., 0::2], x[..., 1::2]), x.new_zeros(x.shape[0])

    def inverse(self, pair: Pair, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = pair
        x = torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
        return x, a.new_zeros(a.shape[0])


class TupleFlip(nn.Module):
    """(a, b) -> (b, a), so that the next coupling transforms the other half."""

    def forward(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        return (pair[1], pair[0]), pair[0].new_zeros(pair[0].shape[0])

    def inverse(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        return self.forward(pair)


class ActNorm(_DataInit):
    """Per-element affine h -> g * h + b of each half (the reference's "Norm"), g floored 1e-10.

    Parameters ``norm0_g``, ``norm0_b`` (first half), ``norm1_g``, ``norm1_b`` (second), each of
    shape (C, H, W / 2). log|det| = sum log g. Data-dependent init: g = 1 / sqrt(var + 1e-6),
    b = -mean g with mean and variance over the batch, so the first batch's outputs have zero
    mean and unit variance per element.
    """

    def __init__(self, half_shape: tuple[int, int, int]):
        super().__init__()
        for i in range(2):
            self.register_parameter(f"norm{i}_g", nn.Parameter(torch.ones(half_shape)))
            self.register_parameter(f"norm{i}_b", nn.Parameter(torch.zeros(half_shape)))

    def _params(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"norm{i}_g").clamp_min(1e-10), getattr(self, f"norm{i}_b")

    def _log_det(self, like: Tensor) -> Tensor:
        total = sum(torch.log(self._params(i)[0]).sum() for i in range(2))
        return total.expand(like.shape[0])

    def forward(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        if self.data_init:
            with torch.no_grad():
                for i, h in enumerate(pair):
                    mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
                    scale = torch.rsqrt(var + 1e-6)
                    getattr(self, f"norm{i}_g").copy_(scale)
                    getattr(self, f"norm{i}_b").copy_(-mean * scale)
        out = tuple(h * self._params(i)[0] + self._params(i)[1] for i, h in enumerate(pair))
        return out, self._log_det(pair[0])

    def inverse(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        out = tuple((h - self._params(i)[1]) / self._params(i)[0] for i, h in enumerate(pair))
        return out, -self._log_det(pair[0])


class Invertible1x1(nn.Module):
    """Invertible 1x1 convolution of each half (the reference's "Pointwise").

    ``W0``, ``W1`` (C, C) act on the channel vector as h_out[j] = sum_i h[i] W[i, j] (the
    reference's orientation); initialised to I + 0.001 N(0, 1). log|det| = (H W / 2) log|det W|.
    """

    def __init__(self, channels: int):
        super().__init__()
        for i in range(2):
            weight = torch.eye(channels) + 1e-3 * torch.randn(channels, channels)
            self.register_parameter(f"W{i}", nn.Parameter(weight))

    def _transform(self, pair: Pair, inverse: bool) -> tuple[Pair, Tensor]:
        out, log_det = [], 0.0
        for i, h in enumerate(pair):
            weight = getattr(self, f"W{i}")
            positions = h.shape[2] * h.shape[3]
            if inverse:
                out.append(torch.einsum("bihw,ij->bjhw", h, torch.linalg.inv(weight)))
                log_det = log_det - positions * torch.linalg.slogdet(weight)[1]
            else:
                out.append(torch.einsum("bihw,ij->bjhw", h, weight))
                log_det = log_det + positions * torch.linalg.slogdet(weight)[1]
        return tuple(out), log_det.expand(pair[0].shape[0])

    def forward(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        return self._transform(pair, inverse=False)

    def inverse(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        return self._transform(pair, inverse=True)


class MixLogisticAttnCoupling(nn.Module):
    """Coupling (a, b) -> (a, exp(s) logit(F(b)) + t), parameters from a network of (a, context).

    F is a K-component logistic mixture per element; s = tanh(.), t and the mixture logits,
    means and log-scales (floored at -7) come from the coupling network:

    - ``cifar10``/``small``: ``proj_in`` (3x3 conv) -> blocks -> ``block{n-1}_proj_out`` (3x3
      conv, init scale 0.1) to C (2 + 3K) channels;
    - ``imagenet32``: ``c1`` (weight-normalised 3x3) -> blocks -> concat-ELU ->
      ``block{n-1}_c2`` (weight-normalised 3x3, init scale 0.1);

    where each block i is ``block{i}_conv`` (gated conv with the context, 1x1 second conv),
    ``block{i}_ln1``, ``block{i}_attn`` (gated attention with ``pos_emb``), ``block{i}_ln2``.
    log|det| = sum [log pdf - log F - log(1 - F)](b) + sum s.
    """

    def __init__(
        self,
        channels: int,
        half_hw: tuple[int, int],
        filters: int,
        blocks: int,
        components: int,
        heads: int,
        context_channels: int,
        dropout: float,
        weight_norm: bool,
    ):
        super().__init__()
        self.channels, self.components, self.blocks, self.weight_norm = (
            channels,
            components,
            blocks,
            weight_norm,
        )
        conv = WeightNormConv2d if weight_norm else Conv2d
        self.pos_emb = nn.Parameter(torch.randn(filters, *half_hw) * 0.01)
        out_channels = channels * (2 + 3 * components)
        if weight_norm:
            self.c1 = conv(channels, filters, 3)
        else:
            self.proj_in = conv(channels, filters, 3)
        for i in range(blocks):
            self.add_module(
                f"block{i}_conv", GatedConv(filters, context_channels, True, dropout, conv=conv)
            )
            self.add_module(f"block{i}_ln1", LayerNorm(filters))
            self.add_module(f"block{i}_attn", GatedAttention(filters, heads, dropout))
            self.add_module(f"block{i}_ln2", LayerNorm(filters))
        last = f"block{blocks - 1}"
        if weight_norm:
            self.add_module(f"{last}_c2", conv(2 * filters, out_channels, 3, init_scale=0.1))
        else:
            self.add_module(f"{last}_proj_out", conv(filters, out_channels, 3, init_scale=0.1))

    def transform_params(self, cond: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        """(s, t, logits, means, logscales): s, t (batch, C, H, W'), the rest (..., K)."""
        last = f"block{self.blocks - 1}"
        h = self.c1(cond) if self.weight_norm else self.proj_in(cond)
        for i in range(self.blocks):
            h = getattr(self, f"block{i}_conv")(h, context)
            h = getattr(self, f"block{i}_ln1")(h)
            h = getattr(self, f"block{i}_attn")(h, self.pos_emb)
            h = getattr(self, f"block{i}_ln2")(h)
        if self.weight_norm:
            h = getattr(self, f"{last}_c2")(concat_elu(h))
        else:
            h = getattr(self, f"{last}_proj_out")(h)
        batch, _, height, width = h.shape
        k = self.components
        h = h.reshape(batch, self.channels, 2 + 3 * k, height, width).movedim(2, -1)
        s, t = torch.tanh(h[..., 0]), h[..., 1]
        logits, means, logscales = h[..., 2 : 2 + k], h[..., 2 + k : 2 + 2 * k], h[..., 2 + 2 * k :]
        return s, t, logits, means, logscales.clamp_min(MIN_LOGSCALE)

    def forward(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        cond, h = pair
        s, t, logits, means, logscales = self.transform_params(cond, context)
        logit_cdf, log_deriv = _mixlogistic_logit_cdf(h, logits, means, logscales)
        out = logit_cdf * torch.exp(s) + t
        return (cond, out), _sum_per_example(log_deriv + s)

    def inverse(self, pair: Pair, context: Tensor | None = None) -> tuple[Pair, Tensor]:
        cond, out = pair
        s, t, logits, means, logscales = self.transform_params(cond, context)
        logit_cdf = (out - t) * torch.exp(-s)
        h = _mixlogistic_inverse_logit_cdf(logit_cdf, logits, means, logscales)
        log_deriv = _mixlogistic_logit_cdf(h, logits, means, logscales)[1]
        return (cond, h), -_sum_per_example(log_deriv + s)


class Sigmoid(nn.Module):
    """h -> sigmoid(h) in (0, 1); log|det| = sum [log sigmoid(h) + log sigmoid(-h)]."""

    def forward(self, h: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(h), _sum_per_example(F.logsigmoid(h) + F.logsigmoid(-h))

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_u, log_1mu = torch.log(u), torch.log1p(-u)
        return log_u - log_1mu, -_sum_per_example(log_u + log_1mu)


# ----------------------------------------------------------------------------------------------
# Context networks on the image


class ShallowProcessor(nn.Module):
    """Context of the ``cifar10`` dequantiser: split x - 1/2 into its two halves stacked on
    channels, ``proj`` (3x3 conv) to ``channels``, then gated convolutions ``c0``, ``c1``, ``c2``.
    Output (batch, channels, H, W / 2)."""

    def __init__(self, image_channels: int, channels: int, num_convs: int, dropout: float):
        super().__init__()
        self.num_convs = num_convs
        self.proj = Conv2d(2 * image_channels, channels, 3)
        for i in range(num_convs):
            self.add_module(f"c{i}", GatedConv(channels, 0, False, dropout))

    def forward(self, x01: Tensor) -> Tensor:
        x = x01 - 0.5
        h = self.proj(torch.cat([x[..., 0::2], x[..., 1::2]], dim=1))
        for i in range(self.num_convs):
            h = getattr(self, f"c{i}")(h)
        return h


class DeepProcessor(nn.Module):
    """Context of the ``imagenet32`` dequantiser: ``proj`` (weight-normalised conv) to
    ``channels``, then 8 x [gated residual ``c{i}``, layer norm ``dqln{i}``, gated attention
    ``dqattn{i}`` (4 heads, embedding ``pos_emb_dq``), layer norm ``ln{i}``]."""

    def __init__(
        self,
        image_channels: int,
        channels: int,
        half_hw: tuple[int, int],
        num_blocks: int,
        heads: int,
        dropout: float,
    ):
        super().__init__()
        self.num_blocks = num_blocks
        self.proj = WeightNormConv2d(2 * image_channels, channels, 3)
        self.pos_emb_dq = nn.Parameter(torch.randn(channels, *half_hw) * 0.01)
        for i in range(num_blocks):
            self.add_module(f"c{i}", GatedConv(channels, 0, False, dropout, conv=WeightNormConv2d))
            self.add_module(f"dqln{i}", LayerNorm(channels))
            self.add_module(f"dqattn{i}", GatedAttention(channels, heads, dropout))
            self.add_module(f"ln{i}", LayerNorm(channels))

    def forward(self, x01: Tensor) -> Tensor:
        x = x01 - 0.5
        h = self.proj(torch.cat([x[..., 0::2], x[..., 1::2]], dim=1))
        for i in range(self.num_blocks):
            h = getattr(self, f"c{i}")(h)
            h = getattr(self, f"dqln{i}")(h)
            h = getattr(self, f"dqattn{i}")(h, self.pos_emb_dq)
            h = getattr(self, f"ln{i}")(h)
        return h


# ----------------------------------------------------------------------------------------------
# The dequantiser


class FlowppDequantizer(nn.Module):
    """Flow++ dequantiser q(u | x): Gaussian noise -> u in (0, 1)^D given the image x in [0, 1].

    Args:
        arch: "cifar10", "imagenet32" or "small" (the cifar10 layout with free widths).
        num_channels, image_size: image shape C x S x S, or C x H x W for a pair (H, W); the
            width must be even.
        num_filters: hidden channels of the coupling networks (96 / 128 in the paper).
        num_blocks: flow blocks, each [actnorm, (1x1 conv,) coupling, swap] (4 / 8).
        num_components: logistic mixture components K (32).
        num_heads: attention heads of the couplings (4).
        num_conv_blocks: conv/attention blocks per coupling network (2 / 8).
        dropout: dropout rate of the context network.

    Submodules are named after the Flax modules of the paper's reference implementation
    (``models/flowpp/dequantization_{cifar10,imagenet32}.py`` of yang-song/score_flow), which are
    numbered per class in order of creation: ``Norm_{i}`` (:class:`ActNorm`), ``Pointwise_{i}``
    (:class:`Invertible1x1`, cifar10/small only), ``MixLogisticAttnCoupling_{i}``, and
    ``ShallowProcessor_0`` / ``DeepProcessor_0`` (context). Inside a Flax module the reference
    names parameters with flat prefixes ("block0_conv_c1_W"); here the same name is a path of
    submodules joined by "_": the torch key ``MixLogisticAttnCoupling_0.block0_conv.c1.W`` is the
    Flax parameter ``MixLogisticAttnCoupling_0/block0_conv_c1_W``. :meth:`flax_key_map` lists
    every correspondence with the transposition it needs:

    - convolutions: the cifar10 reference's plain convolutions (``*_W``) are applied with the
      image read as (N, W, H, C), so their kernel's first spatial axis runs along the image
      width: Flax (kW, kH, I, O) -> torch OIHW by ``permute(3, 2, 1, 0)`` (layout
      "conv_transposed"); the imagenet32 weight-normalised ``*_V`` are ordinary HWIO ->
      ``permute(3, 2, 0, 1)`` ("conv"); dense ("nin") layers are 1x1 convolutions here:
      Flax (I, O) -> torch (O, I, 1, 1) ("dense");
    - actnorm ``norm{j}_g/b`` and position embeddings: Flax (H, W/2, C) -> torch (C, H, W/2);
    - layer norm ``*_g/b``: Flax (1, 1, 1, C) -> torch (C,);
    - ``Pointwise`` ``W{j}``, biases and weight-norm gains: unchanged.
    """

    def __init__(
        self,
        arch: str = "cifar10",
        num_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_filters: int = 96,
        num_blocks: int = 4,
        num_components: int = 32,
        num_heads: int = 4,
        num_conv_blocks: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown dequantiser arch {arch!r}: choose one of {ARCHS}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if width % 2:
            raise ValueError(
                f"the Flow++ dequantiser splits image columns in two: the image width must be "
                f"even, got {width}"
            )
        self.arch, self.num_blocks = arch, num_blocks
        self.image_shape = (num_channels, height, width)
        half_hw = (height, width // 2)
        context_channels = 32 if arch != "small" else num_filters
        weight_norm = arch == "imagenet32"

        self.flow_names = []
        for i in range(num_blocks):
            self._add_step(f"Norm_{i}", ActNorm((num_channels, *half_hw)))
            if not weight_norm:
                self._add_step(f"Pointwise_{i}", Invertible1x1(num_channels))
            coupling = MixLogisticAttnCoupling(
                num_channels,
                half_hw,
                num_filters,
                num_conv_blocks,
                num_components,
                num_heads,
                context_channels,
                0.0,
                weight_norm,
            )
            self._add_step(f"MixLogisticAttnCoupling_{i}", coupling)
            self._add_step(f"TupleFlip_{i}", TupleFlip())
        self.split = CheckerboardSplit()
        self.sigmoid = Sigmoid()
        if weight_norm:
            self.DeepProcessor_0 = DeepProcessor(num_channels, 32, half_hw, 8, 4, dropout)
        else:
            self.ShallowProcessor_0 = ShallowProcessor(num_channels, context_channels, 3, dropout)
        self.register_buffer("initialized", torch.tensor(False))

    def _add_step(self, name: str, module: nn.Module) -> None:
        self.add_module(name, module)
        self.flow_names.append(name)

    def context(self, x01: Tensor) -> Tensor:
        """The context network's features of the image, (batch, 32, H, W / 2)."""
        if self.arch == "imagenet32":
            return self.DeepProcessor_0(x01)
        return self.ShallowProcessor_0(x01)

    @torch.no_grad()
    def initialize(self, x01: Tensor, noise: Tensor) -> None:
        """Data-dependent initialisation on one batch: actnorm outputs get zero mean and unit
        variance, convolution outputs are standardised. Marks the model ``initialized``."""
        layers = [m for m in self.modules() if isinstance(m, _DataInit)]
        for layer in layers:
            layer.data_init = True
        try:
            self._flow(x01, noise)
        finally:
            for layer in layers:
                layer.data_init = False
        self.initialized.fill_(True)
        log.info(
            "initialised the dequantiser's actnorm and convolutions on %d images", x01.shape[0]
        )

    def _flow(self, x01: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        context = self.context(x01)
        h, log_det = self.split(noise)
        for name in self.flow_names:
            h, step_log_det = getattr(self, name)(h, context)
            log_det = log_det + step_log_det
        h, step_log_det = self.split.inverse(h)
        u, sigmoid_log_det = self.sigmoid(h)
        return u, log_det + step_log_det + sigmoid_log_det

    def forward(self, x01: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """u = f(noise; x) in (0, 1)^D and log q(u | x) = log N(noise) - log|det df/dnoise|.

        ``x01`` and ``noise`` are (batch, C, H, W); returns u (batch, C, H, W) and log_q
        (batch,) in nats. The first call of an uninitialised model initialises it on this batch.
        """
        if not bool(self.initialized):
            self.initialize(x01, noise)
        u, log_det = self._flow(x01, noise)
        return u, standard_normal_logp(noise) - log_det

    def inverse(self, x01: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """noise = f^{-1}(u; x) and log q(u | x) = log N(noise) + log|det df^{-1}/du|.

        The coupling inverses are solved by bisection (about 100 evaluations of the mixture CDF);
        meant for tests and density evaluation, not for training.
        """
        context = self.context(x01)
        h, log_det = self.sigmoid.inverse(u)
        h, step_log_det = self.split(h)
        log_det = log_det + step_log_det
        for name in reversed(self.flow_names):
            h, step_log_det = getattr(self, name).inverse(h, context)
            log_det = log_det + step_log_det
        noise, step_log_det = self.split.inverse(h)
        return noise, standard_normal_logp(noise) + log_det + step_log_det

    def sample(
        self, x01: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw u ~ q(u | x) for each image of ``x01``: returns (u, log_q) as :meth:`forward`."""
        noise = torch.randn(x01.shape, generator=generator, device=x01.device, dtype=x01.dtype)
        return self(x01, noise)

    def flax_key_map(self) -> dict[str, tuple[tuple[str, str], str]]:
        """torch parameter name -> ((Flax module, Flax parameter), layout) for conversion.

        ``layout`` is "conv" (HWIO -> OIHW), "conv_transposed" ((kW, kH, I, O) -> OIHW), "dense"
        ((I, O) -> (O, I, 1, 1)), "hwc"
        ((H, W, C) -> (C, H, W)), "layernorm" ((1, 1, 1, C) -> (C,)) or "same".
        """
        mapping = {}
        for key, param in self.named_parameters():
            module, *path = key.split(".")
            name = "_".join(path)
            if path[-1] in ("W", "V") and param.dim() == 4:
                if param.shape[-1] == 1:
                    layout = "dense"
                else:
                    layout = "conv" if path[-1] == "V" else "conv_transposed"
            elif path[-1] in ("g", "b") and len(path) > 1 and _is_layernorm(self, key):
                layout = "layernorm"
            elif param.dim() == 3:
                layout = "hwc"
            else:
                layout = "same"
            mapping[key] = ((module, name), layout)
        return mapping


def _is_layernorm(root: nn.Module, key: str) -> bool:
    """Whether parameter ``key`` of ``root`` belongs to a :class:`LayerNorm`."""
    owner = root.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(owner, LayerNorm)


def standard_normal_logp(noise: Tensor) -> Tensor:
    """log N(noise; 0, I) summed per example, shape (batch,)."""
    dim = noise[0].numel()
    return -0.5 * _sum_per_example(noise.square()) - 0.5 * dim * math.log(2 * math.pi)
