"""Tests of the Flow++ dequantiser: exact inverses, exact log-determinants, a normalised q."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from scoreflow.nets.flowpp import (
    ActNorm,
    CheckerboardSplit,
    FlowppDequantizer,
    Invertible1x1,
    MixLogisticAttnCoupling,
    Sigmoid,
    TupleFlip,
    mixlogistic_logcdf,
    mixlogistic_logpdf,
)

C, H, W = 2, 2, 4  # tiny image: D = 16, halves (2, 2, 2)
HALF = (C, H, W // 2)


def tiny_dequantizer(channels=C, height=H, width=W, seed=0) -> FlowppDequantizer:
    """A small float64 dequantiser, data-initialised, then its weights perturbed at random so
    that no layer is close to the identity."""
    torch.manual_seed(seed)
    model = FlowppDequantizer(
        "small",
        channels,
        (height, width),
        num_filters=4,
        num_blocks=2,
        num_components=3,
        num_heads=2,
        num_conv_blocks=1,
    ).double()
    x01 = torch.rand(32, channels, height, width, dtype=torch.float64)
    model.initialize(x01, torch.randn_like(x01))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_pair(batch=1):
    return tuple(torch.randn(batch, *HALF, dtype=torch.float64) for _ in range(2))


def flat(value) -> torch.Tensor:
    if isinstance(value, tuple):
        return torch.cat([v.reshape(-1) for v in value])
    return value.reshape(-1)


def unflat_pair(v: torch.Tensor):
    a, b = v.chunk(2)
    return a.reshape(1, *HALF), b.reshape(1, *HALF)


def perturbed(module: torch.nn.Module, scale=0.3) -> torch.nn.Module:
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _context():
    return torch.randn(1, 3, *HALF[1:], dtype=torch.float64)


def _coupling():
    torch.manual_seed(1)
    return perturbed(MixLogisticAttnCoupling(C, HALF[1:], 4, 1, 3, 2, 3, 0.0, False), 0.5)


def _coupling_weight_norm():
    torch.manual_seed(2)
    return perturbed(MixLogisticAttnCoupling(C, HALF[1:], 4, 2, 3, 1, 3, 0.0, True), 0.5)


PAIR_LAYERS = {
    "actnorm": lambda: perturbed(ActNorm(HALF)),
    "invertible_1x1": lambda: perturbed(Invertible1x1(C)),
    "coupling": _coupling,
    "coupling_imagenet32": _coupling_weight_norm,
    "flip": TupleFlip,
}


@pytest.mark.parametrize("name", sorted(PAIR_LAYERS))
def test_pair_layer_inverse_and_log_det(name):
    torch.manual_seed(3)
    layer = PAIR_LAYERS[name]()
    context = _context()
    pair = random_pair()

    out, log_det = layer(pair, context)
    back, inverse_log_det = layer.inverse(out, context)
    for original, restored in zip(pair, back, strict=True):
        torch.testing.assert_close(restored, original, atol=1e-9, rtol=1e-9)

    jac = jacobian(lambda v: flat(layer(unflat_pair(v), context)[0]), flat(pair))
    expected = torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(log_det[0], expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(inverse_log_det[0], -expected, atol=1e-8, rtol=1e-8)


def test_split_and_sigmoid_inverse_and_log_det():
    torch.manual_seed(4)
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    split = CheckerboardSplit()
    pair, log_det = split(x)
    torch.testing.assert_close(split.inverse(pair)[0], x)
    assert pair[0].shape == (1, *HALF)
    torch.testing.assert_close(pair[0][..., 1], x[..., 2])  # even columns
    jac = jacobian(lambda v: flat(split(v.reshape(x.shape))[0]), x.reshape(-1))
    assert float(log_det) == 0.0
    assert torch.linalg.slogdet(jac)[1].abs() < 1e-12

    sigmoid = Sigmoid()
    u, log_det = sigmoid(x)
    back, inverse_log_det = sigmoid.inverse(u)
    torch.testing.assert_close(back, x)
    jac = jacobian(lambda v: sigmoid(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    expected = torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(log_det[0], expected)
    torch.testing.assert_close(inverse_log_det[0], -expected)


def test_mixture_of_logistics_cdf_and_pdf():
    """The mixture's pdf is the derivative of its CDF (finite differences) and F in (0, 1)."""
    torch.manual_seed(5)
    logits, means, logscales = (torch.randn(7, 4, dtype=torch.float64) for _ in range(3))
    x = torch.randn(7, dtype=torch.float64)
    step = 1e-5
    cdf = lambda v: mixlogistic_logcdf(v, logits, means, logscales).exp()  # noqa: E731
    numeric = (cdf(x + step) - cdf(x - step)) / (2 * step)
    torch.testing.assert_close(mixlogistic_logpdf(x, logits, means, logscales).exp(), numeric)


def test_dequantizer_inverse_and_log_q_by_autograd():
    """log q(u | x) = log N(noise) - log|det du/dnoise|, the Jacobian by autograd."""
    model = tiny_dequantizer()
    torch.manual_seed(6)
    x01 = torch.rand(1, C, H, W, dtype=torch.float64)
    noise = torch.randn(1, C, H, W, dtype=torch.float64)

    u, log_q = model(x01, noise)
    assert ((u > 0) & (u < 1)).all()
    jac = jacobian(lambda v: model(x01, v.reshape(noise.shape))[0].reshape(-1), noise.reshape(-1))
    log_normal = -0.5 * noise.square().sum() - 0.5 * noise.numel() * math.log(2 * math.pi)
    torch.testing.assert_close(log_q[0], log_normal - torch.linalg.slogdet(jac)[1])

    noise_back, log_q_back = model.inverse(x01, u)
    torch.testing.assert_close(noise_back, noise, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(log_q_back, log_q, atol=1e-8, rtol=1e-8)


def test_q_integrates_to_one_on_the_unit_square():
    """D = 2 (a 1x1x2 image): the integral of q(u | x) over (0, 1)^2 is 1.

    Quadrature in logit space v = logit(u), where q(u) du = q(sigmoid(v)) prod sigmoid'(v) dv
    is smooth and decays fast: a 129 x 129 grid on [-16, 16]^2.
    """
    model = tiny_dequantizer(1, 1, 2, seed=7)
    x01 = torch.rand(1, 1, 1, 2, dtype=torch.float64)
    with torch.no_grad():
        grid = torch.linspace(-16, 16, 129, dtype=torch.float64)
        v1, v2 = torch.meshgrid(grid, grid, indexing="ij")
        v = torch.stack([v1, v2], dim=-1).reshape(-1, 1, 1, 2)
        u = torch.sigmoid(v)
        _, log_q = model.inverse(x01.expand(v.shape[0], -1, -1, -1), u)
        log_jac = (torch.nn.functional.logsigmoid(v) + torch.nn.functional.logsigmoid(-v)).sum(
            dim=(1, 2, 3)
        )
        integral = torch.exp(log_q + log_jac).sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(integral) - 1.0) < 1e-3, float(integral)


def test_actnorm_data_init_standardises_the_first_batch():
    torch.manual_seed(8)
    layer = ActNorm(HALF)
    pair = tuple(3.0 + 2.0 * torch.randn(64, *HALF) for _ in range(2))
    layer.data_init = True
    out, _ = layer(pair)
    for h in out:
        torch.testing.assert_close(h.mean(dim=0), torch.zeros(HALF), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            h.var(dim=0, unbiased=False), torch.ones(HALF), atol=1e-4, rtol=0
        )


def test_first_forward_initialises_once_and_state_dict_records_it():
    torch.manual_seed(9)
    model = FlowppDequantizer(
        "small", 1, 8, num_filters=8, num_blocks=2, num_components=2, num_heads=1, num_conv_blocks=1
    )
    assert not bool(model.initialized)
    x01 = torch.rand(16, 1, 8, 8)
    model(x01, torch.randn_like(x01))
    assert bool(model.initialized)
    g = model.Norm_0.norm0_g.detach().clone()
    model(torch.rand(16, 1, 8, 8) * 0.1, torch.randn(16, 1, 8, 8))
    torch.testing.assert_close(model.Norm_0.norm0_g, g)  # no second initialisation
    assert bool(model.state_dict()["initialized"])


def test_sample_is_reproducible_and_in_the_cube():
    model = FlowppDequantizer(
        "small", 1, 8, num_filters=8, num_blocks=1, num_components=2, num_heads=1, num_conv_blocks=1
    )
    x01 = torch.rand(4, 1, 8, 8)
    u1, log_q1 = model.sample(x01, torch.Generator().manual_seed(0))
    u2, log_q2 = model.sample(x01, torch.Generator().manual_seed(0))
    torch.testing.assert_close(u1, u2)
    torch.testing.assert_close(log_q1, log_q2)
    assert u1.shape == x01.shape and log_q1.shape == (4,)
    assert ((u1 > 0) & (u1 < 1)).all()


def test_odd_image_size_is_refused():
    with pytest.raises(ValueError, match="even"):
        FlowppDequantizer(
            "small",
            1,
            7,
            num_filters=8,
            num_blocks=1,
            num_components=2,
            num_heads=1,
            num_conv_blocks=1,
        )


@pytest.mark.parametrize(
    "arch, kwargs, expected",
    [
        ("cifar10", {}, 3.5e6),
        ("imagenet32", dict(num_filters=128, num_blocks=8, num_conv_blocks=8), 35.5e6),
    ],
)
def test_parameter_counts_match_the_paper(arch, kwargs, expected):
    model = FlowppDequantizer(arch, 3, 32, **kwargs)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.02, count


def test_flax_key_map_covers_every_parameter_with_reference_shapes():
    model = FlowppDequantizer("cifar10", 3, 32)
    mapping = model.flax_key_map()
    params = dict(model.named_parameters())
    assert set(mapping) == set(params)
    assert mapping["MixLogisticAttnCoupling_0.block0_conv.c1.W"] == (
        ("MixLogisticAttnCoupling_0", "block0_conv_c1_W"),
        "conv_transposed",
    )
    assert mapping["MixLogisticAttnCoupling_3.block1_proj_out.W"][0] == (
        "MixLogisticAttnCoupling_3",
        "block1_proj_out_W",
    )
    assert mapping["Norm_2.norm1_g"] == (("Norm_2", "norm1_g"), "hwc")
    assert mapping["Pointwise_1.W0"] == (("Pointwise_1", "W0"), "same")
    assert mapping["ShallowProcessor_0.c2.c2.W"] == (
        ("ShallowProcessor_0", "c2_c2_W"),
        "conv_transposed",
    )
    assert mapping["MixLogisticAttnCoupling_0.block0_attn.proj1.W"][1] == "dense"
    assert mapping["MixLogisticAttnCoupling_0.block0_ln2.g"][1] == "layernorm"
    assert params["Norm_0.norm0_g"].shape == (3, 32, 16)
    wide = FlowppDequantizer(
        "imagenet32", 3, 32, num_filters=16, num_blocks=1, num_components=2, num_conv_blocks=1
    ).flax_key_map()
    assert wide["MixLogisticAttnCoupling_0.c1.V"] == (("MixLogisticAttnCoupling_0", "c1_V"), "conv")
    assert wide["MixLogisticAttnCoupling_0.block0_c2.g"][0][1] == "block0_c2_g"
    assert wide["DeepProcessor_0.pos_emb_dq"][1] == "hwc"
