"""Tests of the DDPM++ score network: shapes, published layout, initialisation, numerics."""

from __future__ import annotations

import importlib
import math
import os
import sys
import types

import ml_collections
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_NCSNPP

from scoreflow.nets.ncsnpp import AttnBlock, NCSNpp, ResnetBlockBigGAN, count_parameters

TINY = TINY_NCSNPP

CIFAR10 = dict(
    TINY, image_size=32, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,)
)
CIFAR10_DEEP = dict(CIFAR10, num_res_blocks=8)


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every parameter random values so that no layer is (almost) zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"resblock_type": "ddpm"},
        {"resblock_type": "ddpm", "resamp_with_conv": False},
        {"embedding_type": "fourier", "scale_by_sigma": True, "centered": False},
        {"conditional": False, "skip_rescale": False},
    ],
)
def test_tiny_forward_backward_shapes(overrides):
    torch.manual_seed(0)
    model = NCSNpp(**dict(TINY, **overrides))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    if overrides.get("embedding_type") == "fourier":
        time_cond = torch.tensor([0.05, 20.0])
    else:
        time_cond = torch.tensor([3.0, 900.0])
    out = model(x, time_cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # without conditioning the blocks' Dense_0 layers exist (for the layout) but are unused
    unused = "Dense_0" if not model.conditional else "-"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in trainable if unused not in n)


def test_channels_last_gives_same_output():
    torch.manual_seed(0)
    model = NCSNpp(**TINY).eval()
    _randomize(model)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10.0, 500.0])
    expected = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_float64_network_runs_in_float64_and_agrees_with_float32():
    torch.manual_seed(0)
    model = NCSNpp(**TINY).eval()
    _randomize(model)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10.0, 500.0])
    expected = model(x, t)
    got = model.double()(x.double(), t.double())  # e.g. for a tight reference ODE solve
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-4)


def _expected_key_count(ch_mult, num_res_blocks, attn_levels) -> int:
    """Entries of the published state dict, counted from the architecture's description.

    BigGAN block: GroupNorm_0/1, Conv_0/1, Dense_0 (2 entries each) plus Conv_2 (2) when it
    changes channels or resolution; attention: GroupNorm_0 and NIN_0..3 (W, b each).
    """
    plain, shortcut, attn = 10, 12, 10
    count = 1 + 4 + 2  # sigmas buffer, two embedding Dense layers, input conv
    levels = len(ch_mult)
    channels = [1] + list(ch_mult)  # input conv has nf channels = 1 * nf
    for level in range(levels):
        count += shortcut if channels[level] != ch_mult[level] else plain
        count += (num_res_blocks - 1) * plain
        count += num_res_blocks * attn if level in attn_levels else 0
        count += shortcut if level != levels - 1 else 0  # down block
    count += 3 * plain  # middle: block, attention, block (attn has 10 entries too)
    for level in range(levels):
        count += (num_res_blocks + 1) * shortcut  # the skip concatenation changes channels
        count += attn if level in attn_levels else 0
        count += shortcut if level != 0 else 0  # up block
    return count + 4  # output GroupNorm and conv


@pytest.mark.parametrize(
    "config, num_params, num_blocks",
    [(CIFAR10, 61_804_419, 4), (CIFAR10_DEEP, 106_632_579, 8)],
)
def test_full_configs_parameter_counts_and_layout(config, num_params, num_blocks):
    with torch.device("meta"):
        model = NCSNpp(**config)
    assert count_parameters(model) == num_params

    state = model.state_dict()
    assert len(state) == _expected_key_count((1, 2, 2, 2), num_blocks, attn_levels={1})
    nf, temb = 128, 512
    first_attn = 3 + num_blocks + 1 + 1  # after level 0's blocks, its down block, a block
    expected = {
        "sigmas": (1000,),
        "all_modules.0.weight": (temb, nf),
        "all_modules.1.weight": (temb, temb),
        "all_modules.2.weight": (nf, 3, 3, 3),
        "all_modules.3.GroupNorm_0.weight": (nf,),
        "all_modules.3.Dense_0.weight": (nf, temb),
        "all_modules.3.Conv_1.weight": (nf, nf, 3, 3),
        f"all_modules.{3 + num_blocks}.Conv_2.weight": (nf, nf, 1, 1),
        f"all_modules.{4 + num_blocks}.Conv_2.weight": (2 * nf, nf, 1, 1),
        f"all_modules.{first_attn}.NIN_0.W": (2 * nf, 2 * nf),
        f"all_modules.{first_attn}.NIN_3.b": (2 * nf,),
        f"all_modules.{first_attn}.GroupNorm_0.bias": (2 * nf,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    last = len(model.all_modules) - 1
    assert tuple(state[f"all_modules.{last}.weight"].shape) == (3, nf, 3, 3)
    assert tuple(state[f"all_modules.{last - 1}.weight"].shape) == (nf,)
    assert state["sigmas"].dtype == torch.float64


def test_init_scale_zero_gives_near_zero_output():
    torch.manual_seed(0)
    model = NCSNpp(**dict(TINY, dropout=0.0))
    x = torch.randn(4, 3, 8, 8)
    out = model(x, torch.tensor([1.0, 10.0, 100.0, 999.0]))
    assert out.abs().max() < 1e-3
    # the same network with unit-scale last layers is far from zero
    torch.manual_seed(0)
    model = NCSNpp(**dict(TINY, dropout=0.0, init_scale=1.0))
    assert model(x, torch.tensor([1.0, 10.0, 100.0, 999.0])).abs().max() > 1e-2


def test_attention_block_matches_direct_formula():
    torch.manual_seed(0)
    block = AttnBlock(16, skip_rescale=True, init_scale=1.0)
    _randomize(block)
    x = torch.randn(2, 16, 4, 4)
    gn = block.GroupNorm_0
    h = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    h = h.flatten(2).transpose(1, 2)  # (batch, positions, C)
    q, k, v = (h @ getattr(block, f"NIN_{i}").W + getattr(block, f"NIN_{i}").b for i in range(3))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    out = (weights @ v) @ block.NIN_3.W + block.NIN_3.b
    expected = (x + out.transpose(1, 2).reshape(x.shape)) / math.sqrt(2)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_biggan_down_block_matches_direct_formula():
    torch.manual_seed(0)
    block = ResnetBlockBigGAN(8, 16, temb_dim=12, down=True, dropout=0.0, init_scale=1.0)
    _randomize(block)
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)

    def norm_act(gn, y):
        return F.silu(F.group_norm(y, gn.num_groups, gn.weight, gn.bias, eps=1e-6))

    def pool(y):  # mean over each 2x2 patch
        return y.reshape(2, -1, 2, 2, 2, 2).mean(dim=(3, 5))

    h = pool(norm_act(block.GroupNorm_0, x))
    h = F.conv2d(h, block.Conv_0.weight, block.Conv_0.bias, padding=1)
    h = h + (F.silu(temb) @ block.Dense_0.weight.T + block.Dense_0.bias)[:, :, None, None]
    h = F.conv2d(norm_act(block.GroupNorm_1, h), block.Conv_1.weight, block.Conv_1.bias, padding=1)
    skip = F.conv2d(pool(x), block.Conv_2.weight, block.Conv_2.bias)
    torch.testing.assert_close(block(x, temb), (skip + h) / math.sqrt(2), rtol=1e-5, atol=1e-5)


def test_unsupported_paths_raise():
    with pytest.raises(NotImplementedError, match="FIR"):
        NCSNpp(**TINY, fir=True)
    with pytest.raises(NotImplementedError, match="progressive"):
        NCSNpp(**TINY, progressive="output_skip")


# -------------------------------------------------------------------------------------------
# Cross-check against score_sde_pytorch, only when SCORE_SDE_PYTORCH names a checkout of it.
# -------------------------------------------------------------------------------------------
REFERENCE = os.environ.get("SCORE_SDE_PYTORCH")


def _reference_ncsnpp_module(root: str):
    """Import the reference's models.ncsnpp with placeholders for its CUDA/TF-only imports.

    The placeholders are removed again after the import, so later tests see the real packages.
    """
    added = []
    for name in ("op", "tensorflow", "tensorflow_datasets", "jax"):
        if name not in sys.modules:
            placeholder = types.ModuleType(name)
            placeholder.__spec__ = importlib.machinery.ModuleSpec(name, None)
            placeholder.upfirdn2d = placeholder.fused_leaky_relu = None
            placeholder.FusedLeakyReLU = object
            sys.modules[name] = placeholder
            added.append(name)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("models.ncsnpp")
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.mark.skipif(not REFERENCE, reason="set SCORE_SDE_PYTORCH to a score_sde_pytorch checkout")
@pytest.mark.parametrize("width", ["small", "full"])
def test_matches_score_sde_pytorch(width):
    reference = _reference_ncsnpp_module(REFERENCE)
    ours_config = dict(CIFAR10, dropout=0.1)
    if width == "small":
        ours_config.update(nf=32, ch_mult=(1, 2, 2), num_res_blocks=2)
    # the fields of the reference's cifar10_ddpmpp_continuous config that its NCSNpp reads
    config = ml_collections.ConfigDict()
    config.data = dict(image_size=32, num_channels=3, centered=True)
    config.training = dict(continuous=True)
    config.model = {k: ours_config[k] for k in ("nf", "ch_mult", "num_res_blocks")}
    config.model.update(
        nonlinearity="swish",
        sigma_min=0.01,
        sigma_max=50.0,
        num_scales=1000,
        attn_resolutions=(16,),
        dropout=0.1,
        resamp_with_conv=True,
        conditional=True,
        fir=False,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="none",
        progressive_combine="sum",
        embedding_type="positional",
        init_scale=0.0,
        fourier_scale=16,
        scale_by_sigma=False,
    )
    theirs = reference.NCSNpp(config).eval()
    ours = NCSNpp(**ours_config).eval()

    _randomize(theirs, std=0.05)
    state = theirs.state_dict()
    assert list(state) == list(ours.state_dict())
    ours.load_state_dict(state, strict=True)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    time_cond = torch.rand(2, generator=gen) * 999
    with torch.no_grad():
        expected, got = theirs(x, time_cond), ours(x, time_cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
