"""DDPM++ / NCSN++ score network (the "ncsnpp" model of the paper's experiments).

A U-Net of residual blocks with GroupNorm, swish, a sinusoidal (or Gaussian Fourier) embedding
of the time condition, self-attention at chosen resolutions and skip connections from the
down path to the up path. With ``resblock_type="biggan"`` the resolution changes happen inside
residual blocks (average pooling down, nearest-neighbour up); with ``"ddpm"`` they are separate
(strided / nearest-neighbour) convolution layers.

Calling convention: ``model(x, time_cond)`` with x of shape (batch, C, H, W) and time_cond of
shape (batch,): the labels 999 t for VP/subVP SDEs (positional embedding), or the noise scale
sigma(t) for the VE SDE (Fourier embedding of log sigma). The output has the shape of x; for
VP/subVP it is read as a noise prediction (score = -output / std(t)).

Parameter names and shapes follow score_sde_pytorch's NCSNpp exactly (one ``all_modules``
ModuleList numbered in execution order; ``NIN_k.W`` of shape (in, out) and ``NIN_k.b``;
``GroupNorm_k``, ``Conv_k``, ``Dense_k`` inside blocks; the float64 ``sigmas`` buffer of the
discrete VE noise scales), so a state dict written by that project loads with ``strict=True``.
The computation is the same; it is arranged for speed: attention through
``scaled_dot_product_attention`` (no (H W)^2 score tensor kept for the backward pass where a
fused kernel exists) with the query/key/value projections in one matrix product over the
positions, the NIN shortcuts as 1x1 convolutions (which follow the input's memory format, so
the network runs in ``channels_last`` end to end), pooling and nearest-interpolation kernels for
the resampling, and no host synchronisation in the forward pass (it traces with
``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NCSNpp", "count_parameters", "default_init_"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@torch.no_grad()
def default_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM initialisation in place: uniform variance scaling with fan_avg, variance scale/fan.

    The fans are taken with the first axis as "out" and the second as "in", the rest as the
    receptive field: fan_avg = (shape[0] + shape[1]) / 2 * prod(shape[2:]). Samples are
    U(-sqrt(3 v), sqrt(3 v)) with v = scale / fan_avg. A scale of 0 means 1e-10 (so that the
    last layer of a block starts almost at zero but still receives gradients).
    """
    scale = 1e-10 if scale == 0 else scale
    shape = weight.shape
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_avg = (shape[0] + shape[1]) * receptive / 2.0
    bound = math.sqrt(3.0 * scale / fan_avg)
    return weight.uniform_(-bound, bound)


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in ``model.parameters()`` (frozen ones included)."""
    return sum(p.numel() for p in model.parameters())


def _conv(in_ch: int, out_ch: int, kernel: int, init_scale: float = 1.0, **kw) -> nn.Conv2d:
    """Conv2d with the DDPM initialisation and a zero bias (3x3: padding 1 unless given)."""
    if kernel == 3:
        kw.setdefault("padding", 1)
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, **kw)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with the DDPM initialisation and a zero bias."""
    dense = nn.Linear(in_features, out_features)
    default_init_(dense.weight)
    nn.init.zeros_(dense.bias)
    return dense


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _rescale(x: Tensor, h: Tensor, skip_rescale: bool) -> Tensor:
    """Residual sum x + h, divided by sqrt(2) when ``skip_rescale`` (keeps the variance)."""
    return torch.add(x, h).mul_(_INV_SQRT2) if skip_rescale else x + h


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): y[b, :, i, j] = x[b, :, i, j] @ W + b.

    W has shape (in_ch, out_ch) and b (out_ch,), the layout of the reference implementations.
    """

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(out_ch, in_ch), init_scale).t().clone())
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        """(batch, in_ch, H, W) -> (batch, out_ch, H, W), computed as a 1x1 convolution."""
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features [sin(2 pi s w), cos(2 pi s w)] of a scalar s per example.

    ``W`` (embedding_size,) ~ N(0, scale^2) is a parameter that takes no gradient, as in the
    reference (so it travels in state dicts and EMA copies).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: Tensor) -> Tensor:
        """(batch,) -> (batch, 2 * embedding_size)."""
        proj = s[:, None] * self.W[None, :] * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def timestep_embedding(timesteps: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of the labels, (batch,) -> (batch, dim).

    emb[:, k] = sin(t w_k), emb[:, half + k] = cos(t w_k), w_k = max_positions^(-k / (half - 1)),
    half = dim // 2, computed in float32, or in float64 for float64 labels (zero-padded by one
    column when dim is odd).
    """
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=timesteps.device) * -step)
    arg = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual (DDPM++ ``AttnBlockpp``).

    q, k, v = NIN_0/1/2(GroupNorm(x)); h = NIN_3(softmax(q k^T / sqrt(C)) v); returns x + h
    (divided by sqrt(2) with ``skip_rescale``). NIN_3 starts at ``init_scale``.
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        """(batch, C, H, W) -> (batch, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.GroupNorm_0(x)

        # positions as rows: (batch, H*W, C)
        tokens = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        w_qkv = torch.cat([self.NIN_0.W, self.NIN_1.W, self.NIN_2.W], dim=1)
        b_qkv = torch.cat([self.NIN_0.b, self.NIN_1.b, self.NIN_2.b])
        qkv = torch.matmul(tokens, w_qkv).add_(b_qkv)
        q, k, v = qkv.unsqueeze(1).split(channels, dim=-1)

        # the default scale of scaled_dot_product_attention is 1/sqrt(C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = torch.addmm(self.NIN_3.b, h.reshape(-1, channels), self.NIN_3.W)
        h = h.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return _rescale(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with optional 2x down/up sampling of both branches.

    h = Conv_1(dropout(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb)))))),
    shortcut Conv_2 (1x1) of resample(x) when the channels or the resolution change.
    Down: 2x2 average pooling; up: nearest-neighbour doubling.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up = up
        self.down = down
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """(batch, in_ch, H, W) -> (batch, out_ch, H', W') with H' = 2H (up), H/2 (down) or H."""
        h = F.silu(self.GroupNorm_0(x))
        if self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.down:
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)

        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = F.silu(self.GroupNorm_1(h))
        h = self.Dropout_0(h)
        h = self.Conv_1(h)

        if self.has_shortcut:
            x = self.Conv_2(x)
        return _rescale(x, h, self.skip_rescale)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block (no resampling); a NIN shortcut when the channels change.

    h = Conv_1(dropout(act(GN_1(Conv_0(act(GN_0(x))) + Dense_0(act(temb)))))).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        dropout: float = 0.1,
        skip_rescale: bool = False,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch
        if self.has_shortcut:
            self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """(batch, in_ch, H, W) -> (batch, out_ch, H, W)."""
        h = self.Conv_0(F.silu(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = F.silu(self.GroupNorm_1(h))
        h = self.Dropout_0(h)
        h = self.Conv_1(h)
        if self.has_shortcut:
            x = self.NIN_0(x)
        return _rescale(x, h, self.skip_rescale)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution after padding right/bottom by one, or
    2x2 average pooling without ``with_conv``."""

    def __init__(self, in_ch: int, with_conv: bool = False):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.Conv_0 = _conv(in_ch, in_ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, C, H, W) -> (batch, C, H/2, W/2)."""
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, followed by a 3x3 convolution with ``with_conv``."""

    def __init__(self, in_ch: int, with_conv: bool = False):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.Conv_0 = _conv(in_ch, in_ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, C, H, W) -> (batch, C, 2H, 2W)."""
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class NCSNpp(nn.Module):
    """The DDPM++ / NCSN++ U-Net, ``forward(x, time_cond) -> output shaped like x``.

    Args:
        image_size: H = W of the inputs.
        num_channels: C of the inputs and outputs.
        nf: base width; level i has nf * ch_mult[i] channels, the time embedding 4 nf.
        ch_mult: width multipliers, one per resolution level (the resolution halves per level).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (H) at which self-attention blocks are inserted.
        dropout: dropout rate inside the residual blocks.
        resamp_with_conv: for ``resblock_type="ddpm"``, resample with convolutions.
        conditional: condition on time (the embedding MLP); False ignores ``time_cond``.
        skip_rescale: divide every residual sum by sqrt(2).
        resblock_type: "biggan" (DDPM++) or "ddpm".
        init_scale: scale of the DDPM initialisation of each block's last layer (0: ~1e-10).
        embedding_type: "positional" (sinusoidal embedding of time_cond, e.g. 999 t) or
            "fourier" (Gaussian Fourier features of log time_cond, time_cond being sigma).
        fourier_scale: standard deviation of the Fourier frequencies.
        scale_by_sigma: divide the output by sigma (time_cond itself for the Fourier
            embedding; ``sigmas[time_cond.long()]`` for the positional one).
        centered: inputs lie in [-1, 1]; otherwise they are in [0, 1] and mapped to 2 x - 1.
        sigma_min, sigma_max, num_scales: the geometric grid of discrete VE noise scales held
            in the ``sigmas`` buffer, from sigma_max down to sigma_min (kept for state-dict
            compatibility with score_sde_pytorch; used only by positional + scale_by_sigma).
        fir, progressive, progressive_input: NCSN++ options, accepted only at their DDPM++
            values (False, "none", "none"); anything else raises NotImplementedError.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        nf: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        init_scale: float = 0.0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        centered: bool = True,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
        fir: bool = False,
        progressive: str = "none",
        progressive_input: str = "none",
    ):
        super().__init__()
        if fir:
            raise NotImplementedError(
                "FIR up/downsampling (model.fir=True) is not implemented; DDPM++ uses fir=False"
            )
        if progressive != "none" or progressive_input != "none":
            raise NotImplementedError(
                "progressive growing paths (model.progressive / model.progressive_input) are "
                "not implemented; DDPM++ uses 'none' for both"
            )
        resblock_type = resblock_type.lower()
        embedding_type = embedding_type.lower()
        if resblock_type not in ("biggan", "ddpm"):
            raise ValueError(f"resblock_type must be 'biggan' or 'ddpm', got {resblock_type!r}")
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(
                f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}"
            )
        num_resolutions = len(ch_mult)
        if image_size % 2 ** (num_resolutions - 1):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2^{num_resolutions - 1} "
                f"(ch_mult has {num_resolutions} levels)"
            )

        sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))
        self.register_buffer("sigmas", torch.tensor(sigmas))
        self.nf = nf
        self.num_res_blocks = num_res_blocks
        self.num_resolutions = num_resolutions
        self.conditional = conditional
        self.resblock_type = resblock_type
        self.embedding_type = embedding_type
        self.scale_by_sigma = scale_by_sigma
        self.centered = centered
        resolutions = [image_size // 2**i for i in range(num_resolutions)]
        self.attn_at_level = tuple(r in attn_resolutions for r in resolutions)

        def resnet_block(in_ch: int, out_ch: int | None = None, **kw) -> nn.Module:
            common = dict(
                dropout=dropout,
                init_scale=init_scale,
                skip_rescale=skip_rescale,
                temb_dim=nf * 4,
            )
            if resblock_type == "ddpm":
                return ResnetBlockDDPM(in_ch, out_ch, **common)
            return ResnetBlockBigGAN(in_ch, out_ch, **common, **kw)

        def attn_block(channels: int) -> AttnBlock:
            return AttnBlock(channels, skip_rescale=skip_rescale, init_scale=init_scale)

        # time embedding
        modules: list[nn.Module] = []
        if embedding_type == "fourier":
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            modules.append(_dense(embed_dim, nf * 4))
            modules.append(_dense(nf * 4, nf * 4))

        # down path
        modules.append(_conv(num_channels, nf, 3))
        skip_channels = [nf]
        in_ch = nf
        for level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[level]
                modules.append(resnet_block(in_ch, out_ch))
                in_ch = out_ch
                if self.attn_at_level[level]:
                    modules.append(attn_block(in_ch))
                skip_channels.append(in_ch)
            if level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    modules.append(Downsample(in_ch, with_conv=resamp_with_conv))
                else:
                    modules.append(resnet_block(in_ch, down=True))
                skip_channels.append(in_ch)

        # middle
        modules.append(resnet_block(in_ch))
        modules.append(attn_block(in_ch))
        modules.append(resnet_block(in_ch))

        # up path
        for level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[level]
                modules.append(resnet_block(in_ch + skip_channels.pop(), out_ch))
                in_ch = out_ch
            if self.attn_at_level[level]:
                modules.append(attn_block(in_ch))
            if level != 0:
                if resblock_type == "ddpm":
                    modules.append(Upsample(in_ch, with_conv=resamp_with_conv))
                else:
                    modules.append(resnet_block(in_ch, up=True))

        # output head
        modules.append(_group_norm(in_ch))
        modules.append(_conv(in_ch, num_channels, 3, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        """Network output for inputs x (batch, C, H, W) and time conditions (batch,).

        Returns a tensor of shape (batch, C, H, W).
        """
        modules = iter(self.all_modules)

        # time embedding
        if self.embedding_type == "fourier":
            used_sigmas = time_cond
            temb = next(modules)(torch.log(time_cond))
        else:
            used_sigmas = None
            temb = timestep_embedding(time_cond, self.nf)
        if self.conditional:
            temb = next(modules)(temb)
            temb = next(modules)(F.silu(temb))
        else:
            temb = None
        temb_blocks = temb

        if not self.centered:
            x = 2.0 * x - 1.0

        # down path
        hs = [next(modules)(x)]
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb_blocks)
                if self.attn_at_level[level]:
                    h = next(modules)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                block = next(modules)
                h = block(hs[-1]) if self.resblock_type == "ddpm" else block(hs[-1], temb_blocks)
                hs.append(h)

        # middle
        h = hs[-1]
        h = next(modules)(h, temb_blocks)
        h = next(modules)(h)
        h = next(modules)(h, temb_blocks)

        # up path
        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb_blocks)
            if self.attn_at_level[level]:
                h = next(modules)(h)
            if level != 0:
                block = next(modules)
                h = block(h) if self.resblock_type == "ddpm" else block(h, temb_blocks)

        # output head
        h = F.silu(next(modules)(h))
        h = next(modules)(h)

        if self.scale_by_sigma:
            if used_sigmas is None:
                used_sigmas = self.sigmas[time_cond.long()]
            h = h / used_sigmas.to(h.dtype).reshape(-1, *([1] * (h.dim() - 1)))
        return h
