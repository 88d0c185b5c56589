"""Tests of the conversion of published checkpoints (score_flow Flax, score_sde_pytorch)."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from conftest import TINY_NCSNPP

from scoreflow import checkpoints, factory
from scoreflow.convert import (
    ConversionError,
    convert_flax_dequantizer_checkpoint,
    convert_flax_score_checkpoint,
    convert_main,
    flax_score_params_to_state_dict,
    load_score_sde_pytorch_checkpoint,
    read_flax_msgpack,
)
from scoreflow.nets.flowpp import FlowppDequantizer
from scoreflow.nets.ncsnpp import NCSNpp
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "small" / "digits_vp.py"


def _tiny_config():
    return factory.load_config_file(CONFIG_FILE)


# ----------------------------------------------------------------------------------------------
# A synthetic score_flow checkpoint, written the way flax.serialization.to_bytes writes one


def _pack(tree):
    """msgpack bytes of a nested dict, encoded as flax.serialization.to_bytes encodes a state:
    numpy arrays as extension type 1 and numpy scalars (np.generic) as extension type 3, both
    with the payload msgpack((shape, dtype name, C-order bytes)), a scalar as its 0-d array;
    strict types, so that np.float64 is not packed as a plain float."""

    def payload(array):
        return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)

    def default(obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, payload(obj))
        if isinstance(obj, np.generic):
            return msgpack.ExtType(3, payload(np.asarray(obj)))
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=default, strict_types=True)


class _FlaxTree:
    """Parameter tree of score_flow's Flax NCSNpp (DDPM++, BigGAN blocks, positional embedding),
    built by retracing its module creation: Flax names submodules <Class>_<k>, counting per
    class inside each parent, with conv kernels HWIO and dense kernels (in, out)."""

    def __init__(self, rng, gn_shape="vector"):
        self.rng, self.gn_shape = rng, gn_shape

    def _array(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32) * 0.2

    def _norm(self, c):
        shape = (c,) if self.gn_shape == "vector" else (1, 1, 1, c)
        return {"scale": 1.0 + self._array(*shape), "bias": self._array(*shape)}

    def _add(self, scope, counters, cls, params):
        k = counters.get(cls, 0)
        counters[cls] = k + 1
        scope[f"{cls}_{k}"] = params

    def conv(self, cin, cout, k=3):
        return {"kernel": self._array(k, k, cin, cout), "bias": self._array(cout)}

    def resblock(self, cin, cout, temb, resample=False):
        block, counters = {}, {}
        self._add(block, counters, "GroupNorm", self._norm(cin))
        self._add(block, counters, "Conv", self.conv(cin, cout))
        self._add(
            block, counters, "Dense", {"kernel": self._array(temb, cout), "bias": self._array(cout)}
        )
        self._add(block, counters, "GroupNorm", self._norm(cout))
        self._add(block, counters, "Conv", self.conv(cout, cout))
        if cin != cout or resample:
            self._add(block, counters, "Conv", self.conv(cin, cout, 1))
        return block

    def attn(self, c):
        block = {"GroupNorm_0": self._norm(c)}
        for i in range(4):
            block[f"NIN_{i}"] = {"W": self._array(c, c), "b": self._array(c)}
        return block

    def ncsnpp(self, image_size, channels, nf, ch_mult, num_res_blocks, attn_resolutions):
        top, counters = {}, {}
        temb = 4 * nf
        self._add(
            top, counters, "Dense", {"kernel": self._array(nf, temb), "bias": self._array(temb)}
        )
        self._add(
            top, counters, "Dense", {"kernel": self._array(temb, temb), "bias": self._array(temb)}
        )
        self._add(top, counters, "Conv", self.conv(channels, nf))
        hs, c, res = [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(c, nf * mult, temb))
                c = nf * mult
                if res in attn_resolutions:
                    self._add(top, counters, "AttnBlockpp", self.attn(c))
                hs.append(c)
            if level != len(ch_mult) - 1:
                self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(c, c, temb, True))
                hs.append(c)
                res //= 2
        self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(c, c, temb))
        self._add(top, counters, "AttnBlockpp", self.attn(c))
        self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(c, c, temb))
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                cin = c + hs.pop()
                c = nf * ch_mult[level]
                self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(cin, c, temb))
            if res in attn_resolutions:
                self._add(top, counters, "AttnBlockpp", self.attn(c))
            if level != 0:
                self._add(top, counters, "ResnetBlockBigGANpp", self.resblock(c, c, temb, True))
                res *= 2
        self._add(top, counters, "GroupNorm", self._norm(c))
        self._add(top, counters, "Conv", self.conv(c, channels))
        return top


def _tiny_tree(seed=0, gn_shape="vector"):
    config = _tiny_config()
    m = config.model
    return _FlaxTree(np.random.default_rng(seed), gn_shape).ncsnpp(
        config.data.image_size,
        config.data.num_channels,
        m.nf,
        tuple(m.ch_mult),
        m.num_res_blocks,
        tuple(m.attn_resolutions),
    )


def _flax_state(params, params_ema, step=7, ema_rate=0.999):
    return {
        "step": step,
        "optimizer": {"target": params, "state": {"step": step, "param_states": {}}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": ema_rate,
        "params_ema": params_ema,
        "rng": np.array([0, 42], dtype=np.uint32),
    }


# ----------------------------------------------------------------------------------------------
# numpy re-implementations (NHWC, from the raw Flax arrays)


def _np_conv(x, kernel, bias):
    """'SAME' stride-1 convolution of x (N, H, W, I) with an HWIO kernel."""
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + x.shape[1], j : j + x.shape[2], :]
            out += patch @ kernel[i, j]
    return out + bias


def _np_group_norm(x, scale, bias, groups, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(n, h, w, c) * scale.reshape(-1) + bias.reshape(-1)


def _np_swish(x):
    return x / (1.0 + np.exp(-x))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()


@pytest.mark.parametrize("gn_shape", ["vector", "nhwc"])
def test_flax_score_checkpoint_converts_and_matches_numpy(tmp_path, gn_shape):
    params, params_ema = _tiny_tree(0, gn_shape), _tiny_tree(1, gn_shape)
    path = tmp_path / "checkpoint_26"
    path.write_bytes(_pack(_flax_state(params, params_ema)))

    model = factory.get_model(_tiny_config())
    state = convert_flax_score_checkpoint(path, model)
    out = tmp_path / "converted.pth"
    checkpoints.save_atomic(state, out)
    loaded = checkpoints.load_checkpoint(out)
    assert loaded["step"] == 7 and loaded["ema"]["__decay__"] == pytest.approx(0.999)
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 8, 1))

    # the input convolution (Flax Conv_0, our all_modules[2])
    expected = _np_conv(x, params["Conv_0"]["kernel"], params["Conv_0"]["bias"])
    with torch.no_grad():
        got = model.all_modules[2](_nchw(x))
    np.testing.assert_allclose(got.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-4)

    # the first BigGAN block (Flax ResnetBlockBigGANpp_0, our all_modules[3]); 32 channels
    p = params["ResnetBlockBigGANpp_0"]
    h0 = rng.standard_normal((2, 8, 8, 32))
    temb = rng.standard_normal((2, 128))
    h = _np_swish(_np_group_norm(h0, p["GroupNorm_0"]["scale"], p["GroupNorm_0"]["bias"], 8))
    h = _np_conv(h, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
    h = h + (_np_swish(temb) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])[:, None, None, :]
    h = _np_swish(_np_group_norm(h, p["GroupNorm_1"]["scale"], p["GroupNorm_1"]["bias"], 8))
    h = _np_conv(h, p["Conv_1"]["kernel"], p["Conv_1"]["bias"])
    expected = (h0 + h) / math.sqrt(2.0)
    with torch.no_grad():
        got = model.all_modules[3](_nchw(h0), torch.from_numpy(temb).float())
    np.testing.assert_allclose(got.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-4)

    # the EMA entry carries params_ema
    ema_kernel = params_ema["Conv_1"]["kernel"]  # output conv, HWIO
    last = len(model.all_modules) - 1
    np.testing.assert_array_equal(
        loaded["ema"][f"all_modules.{last}.weight"].numpy(), ema_kernel.transpose(3, 2, 0, 1)
    )
    torch.testing.assert_close(loaded["model"]["sigmas"], model.sigmas)


def test_convert_main_writes_a_loadable_training_state(tmp_path, console_log):
    path = tmp_path / "checkpoint_26"
    path.write_bytes(_pack(_flax_state(_tiny_tree(0), _tiny_tree(1))))
    out = tmp_path / "ours" / "checkpoint_26.pth"
    argv = ["--kind", "score", "--input", str(path), "--output", str(out)]
    assert convert_main([*argv, "--config", str(CONFIG_FILE)]) == 0
    stderr = console_log.readouterr().err
    assert f"wrote {out}" in stderr and str(path) in stderr
    model = factory.get_model(_tiny_config())
    checkpoints.restore_ema_weights(model, checkpoints.load_checkpoint(out))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_main(
            [*argv[:3], str(tmp_path / "nowhere"), *argv[4:], "--config", str(CONFIG_FILE)]
        )
    with pytest.raises(ValueError, match="--kind"):
        convert_main(["--kind", "onnx", "--input", "a", "--output", "b", "--config", "c"])


def _edited_tree(edit):
    tree = _tiny_tree(0)
    edit(tree)
    return tree


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["ResnetBlockBigGANpp_1"].pop("Dense_0"), "ResnetBlockBigGANpp_1/Dense_0"),
        (lambda t: t.update(Conv_9={"kernel": np.zeros((3, 3, 1, 1), np.float32)}), "Conv_9"),
        (
            lambda t: t["AttnBlockpp_0"]["NIN_2"].update(W=np.zeros((64, 32), np.float32)),
            "AttnBlockpp_0/NIN_2/W",
        ),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_flax_conversion_errors_name_the_entry(tmp_path, edit, message):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(_pack(_flax_state(_edited_tree(edit), _tiny_tree(1))))
    with pytest.raises(ConversionError, match=message):
        convert_flax_score_checkpoint(path, factory.get_model(_tiny_config()))


def test_numpy_scalars_in_a_flax_file_are_read(tmp_path):
    state = _flax_state(_tiny_tree(0), _tiny_tree(1), step=np.int64(7), ema_rate=np.float32(0.99))
    state["lr"] = np.float64(2e-4)
    path = tmp_path / "checkpoint_3"
    path.write_bytes(_pack(state))

    tree = read_flax_msgpack(path)
    assert isinstance(tree["step"], np.int64) and tree["step"] == 7
    assert isinstance(tree["lr"], np.float64) and tree["lr"] == 2e-4
    assert isinstance(tree["ema_rate"], np.float32) and tree["ema_rate"] == np.float32(0.99)
    converted = convert_flax_score_checkpoint(path, factory.get_model(_tiny_config()))
    assert converted["step"] == 7
    assert converted["ema"]["__decay__"] == pytest.approx(0.99)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), None], ids=["vp", "subvp", "none"])
def test_fourier_embedding_of_vp_and_subvp_is_refused(tmp_path, sde):
    """score_flow feeds t to the Fourier embedding of VP/subVP networks, ours log sigma."""
    model = _tiny_ncsnpp(embedding_type="fourier")
    path = tmp_path / "checkpoint_1"
    path.write_bytes(_pack(_flax_state({}, {})))
    with pytest.raises(NotImplementedError, match="Fourier"):
        convert_flax_score_checkpoint(path, model, sde)
    with pytest.raises(NotImplementedError, match="Fourier"):
        flax_score_params_to_state_dict({}, model, sde)
    # VE networks take log sigma in both codes: the conversion proceeds (to the empty tree).
    with pytest.raises(ConversionError, match="lack"):
        convert_flax_score_checkpoint(path, model, VESDE())
    # positional embeddings do not depend on the SDE
    with pytest.raises(ConversionError, match="lack"):
        convert_flax_score_checkpoint(path, _tiny_ncsnpp(), sde)


def test_convert_main_refuses_a_fourier_vp_config(tmp_path):
    config_file = tmp_path / "fourier_vp.py"
    config_file.write_text(
        "from scoreflow.config_defaults import small_config\n"
        "def get_config():\n"
        "    config = small_config('digits', 'vpsde')\n"
        "    config.model.embedding_type = 'fourier'\n"
        "    return config\n"
    )
    path = tmp_path / "checkpoint_1"
    path.write_bytes(_pack(_flax_state({}, {})))
    argv = ["--kind", "score", "--input", str(path), "--output", str(tmp_path / "out.pth")]
    with pytest.raises(NotImplementedError, match="Fourier"):
        convert_main([*argv, "--config", str(config_file)])
    assert not (tmp_path / "out.pth").exists()


def test_not_a_msgpack_file(tmp_path):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(b"\xc1 definitely not msgpack")
    with pytest.raises(ConversionError, match="not a Flax msgpack"):
        convert_flax_score_checkpoint(path, factory.get_model(_tiny_config()))


# ----------------------------------------------------------------------------------------------
# score_sde_pytorch checkpoints


def _tiny_ncsnpp(**overrides):
    kw = dict(image_size=8, num_channels=3, nf=8, ch_mult=(1, 2), num_res_blocks=1)
    kw.update(attn_resolutions=(4,), dropout=0.0, resamp_with_conv=True, conditional=True)
    kw.update(skip_rescale=True, resblock_type="biggan", init_scale=0.0)
    kw.update(embedding_type="positional", fourier_scale=16.0, scale_by_sigma=False)
    kw.update(centered=True, sigma_min=0.01, sigma_max=50.0, num_scales=1000)
    kw.update(overrides)
    return NCSNpp(**kw)


def _score_sde_pytorch_file(path, model, shadow_offset=1.0):
    """Save ``model`` the way score_sde_pytorch's save_checkpoint does (DataParallel keys)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.save(
        {
            "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
            "model": {f"module.{k}": v for k, v in model.state_dict().items()},
            "ema": {
                "decay": 0.9999,
                "num_updates": 12,
                "shadow_params": [p.detach() + shadow_offset for p in trainable],
            },
            "step": 12,
        },
        path,
    )


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_score_sde_pytorch_round_trip(tmp_path, embedding_type):
    torch.manual_seed(0)
    source = _tiny_ncsnpp(embedding_type=embedding_type)
    path = tmp_path / "checkpoint_8.pth"
    _score_sde_pytorch_file(path, source)

    for model in (_tiny_ncsnpp(embedding_type=embedding_type), None):
        state = load_score_sde_pytorch_checkpoint(path, model)
        assert state["step"] == 12 and state["ema"]["__decay__"] == pytest.approx(0.9999)
        target = _tiny_ncsnpp(embedding_type=embedding_type)
        target.load_state_dict(state["model"], strict=True)
        for (name, p), q in zip(source.named_parameters(), target.parameters(), strict=True):
            torch.testing.assert_close(q, p, msg=name)

        # restoring the EMA gives the shadow (+1) for trainable and the weights for frozen ones
        checkpoints.restore_ema_weights(target, state)
        for (name, p), q in zip(source.named_parameters(), target.parameters(), strict=True):
            torch.testing.assert_close(q, p + (1.0 if p.requires_grad else 0.0), msg=name)


class _Pickled:
    """An object that only unpickling code can rebuild (refused by weights_only loads)."""


def test_score_sde_pytorch_errors(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pth"
    _score_sde_pytorch_file(path, _tiny_ncsnpp())
    with pytest.raises(ConversionError, match="missing"):
        load_score_sde_pytorch_checkpoint(path, _tiny_ncsnpp(num_res_blocks=2))
    with pytest.raises(ConversionError, match="all_modules.2.weight"):
        load_score_sde_pytorch_checkpoint(path, _tiny_ncsnpp(num_channels=1))
    with pytest.raises(FileNotFoundError):
        load_score_sde_pytorch_checkpoint(tmp_path / "absent.pth")

    torch.save({"model": {}, "thing": _Pickled()}, tmp_path / "pickled.pth")
    with pytest.raises(ConversionError, match="weights_only"):
        load_score_sde_pytorch_checkpoint(tmp_path / "pickled.pth")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        load_score_sde_pytorch_checkpoint(FIXTURE / "flax_ncsnpp_tiny.msgpack")


# ----------------------------------------------------------------------------------------------
# Flow++ dequantiser


# The parameter tree of score_flow's cifar10 Flow++ dequantiser (models/flowpp/
# dequantization_cifar10.py and modules_cifar10.py there), written out by hand from its module
# definitions. Flax names the flow's parameterised modules Norm_i, Pointwise_i,
# MixLogisticAttnCoupling_i (i = 0..3, in order of creation) and ShallowProcessor_0; inside a
# module, parameters have flat names "<layer>_W", "<layer>_b". Shapes, with C image channels,
# (H, W') = (H, W / 2) the half image, F filters, K mixture components and a context of 32:
#
# - Norm: norm{0,1}_{g,b} (H, W', C), one pair per half;
# - Pointwise: W{0,1} (C, C), h -> h @ W;
# - conv2d "<name>_W" (3, 3, in, out) and "<name>_b" (out,), applied to arrays read as NWHC;
#   nin (dense on the channels) "<name>_W" (in, out), "<name>_b" (out,);
# - gated_conv "<name>": <name>_c1 conv (2 in -> in), <name>_a_proj nin (2 * 32 -> in, only
#   with a context), <name>_c2 nin or conv (2 in -> 2 in); layernorm "<name>_g/_b" (1, 1, 1, F);
# - gated_attn "<name>": <name>_proj1 nin (F -> 3F), <name>_proj2 nin (F -> 2F);
# - MixLogisticAttnCoupling: pos_emb (H, W', F), proj_in conv (C -> F), per block b
#   block{b}_conv (gated conv with the context, nin c2), block{b}_ln1, block{b}_attn,
#   block{b}_ln2, and block{last}_proj_out conv (F -> C (2 + 3K));
# - ShallowProcessor: proj conv (2C -> 32), c0, c1, c2 gated convs with conv c2.

CONTEXT = 32


def _reference_flowpp_tree(rng, channels, height, width, filters, components, conv_blocks):
    """Random arrays in the key tree and shapes of score_flow's cifar10 dequantiser."""
    half = (height, width // 2)

    def arr(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def layer(name, w_shape):
        return {f"{name}_W": arr(*w_shape), f"{name}_b": arr(w_shape[-1])}

    tree = {}
    for i in range(4):
        tree[f"Norm_{i}"] = {
            **{f"norm{j}_g": 1.0 + arr(*half, channels) for j in (0, 1)},
            **{f"norm{j}_b": arr(*half, channels) for j in (0, 1)},
        }
        tree[f"Pointwise_{i}"] = {
            f"W{j}": np.eye(channels, dtype=np.float32) + arr(channels, channels) for j in (0, 1)
        }
        coupling = {"pos_emb": arr(*half, filters), **layer("proj_in", (3, 3, channels, filters))}
        for b in range(conv_blocks):
            coupling.update(layer(f"block{b}_conv_c1", (3, 3, 2 * filters, filters)))
            coupling.update(layer(f"block{b}_conv_a_proj", (2 * CONTEXT, filters)))
            coupling.update(layer(f"block{b}_conv_c2", (2 * filters, 2 * filters)))
            coupling.update(layer(f"block{b}_attn_proj1", (filters, 3 * filters)))
            coupling.update(layer(f"block{b}_attn_proj2", (filters, 2 * filters)))
            for norm in ("ln1", "ln2"):
                coupling[f"block{b}_{norm}_g"] = 1.0 + arr(1, 1, 1, filters)
                coupling[f"block{b}_{norm}_b"] = arr(1, 1, 1, filters)
        out = channels * (2 + 3 * components)
        coupling.update(layer(f"block{conv_blocks - 1}_proj_out", (3, 3, filters, out)))
        tree[f"MixLogisticAttnCoupling_{i}"] = coupling
    processor = layer("proj", (3, 3, 2 * channels, CONTEXT))
    for c in range(3):
        processor.update(layer(f"c{c}_c1", (3, 3, 2 * CONTEXT, CONTEXT)))
        processor.update(layer(f"c{c}_c2", (3, 3, 2 * CONTEXT, 2 * CONTEXT)))
    tree["ShallowProcessor_0"] = processor
    return tree


# numpy versions of the reference's layers, on NHWC arrays of the raw Flax parameters


def _np_conv_nwhc(x, kernel, bias):
    """The reference's Flow++ conv2d: the array (N, H, W, C) is read as (N, W, H, C), so the
    kernel's first spatial axis runs along the image width; the output is written back alike."""
    return _np_conv(x.swapaxes(1, 2), kernel, bias).swapaxes(1, 2)


def _np_nin(x, kernel, bias):
    return x @ kernel + bias


def _np_concat_elu(x):
    both = np.concatenate([x, -x], axis=-1)
    return np.where(both > 0, both, np.expm1(np.minimum(both, 0)))


def _np_gate(x):
    a, b = np.split(x, 2, axis=-1)
    return a / (1.0 + np.exp(-b))


def _np_gated_conv(p, name, x, context=None, use_nin=False):
    c1 = _np_conv_nwhc(_np_concat_elu(x), p[f"{name}_c1_W"], p[f"{name}_c1_b"])
    if context is not None:
        c1 = c1 + _np_nin(_np_concat_elu(context), p[f"{name}_a_proj_W"], p[f"{name}_a_proj_b"])
    c2 = (_np_nin if use_nin else _np_conv_nwhc)(
        _np_concat_elu(c1), p[f"{name}_c2_W"], p[f"{name}_c2_b"]
    )
    return x + _np_gate(c2)


def _np_layernorm(p, name, x):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p[f"{name}_g"] + p[f"{name}_b"]


def _np_gated_attn(p, name, x, pos_emb, heads):
    n, h, w, c = x.shape
    dim = c // heads
    qkv = _np_nin(x + pos_emb, p[f"{name}_proj1_W"], p[f"{name}_proj1_b"])
    qkv = qkv.reshape(n, h * w, 3, heads, dim).transpose(2, 0, 3, 1, 4)  # 3, n, heads, t, d
    q, k, v = qkv
    logits = q @ k.swapaxes(-1, -2) / np.sqrt(dim)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(n, h, w, c)
    return x + _np_gate(_np_nin(out, p[f"{name}_proj2_W"], p[f"{name}_proj2_b"]))


def _np_context(p, x01):
    """ShallowProcessor: checkerboard halves of x - 1/2 on channels, proj, 3 gated convs."""
    x = x01 - 0.5
    h = _np_conv_nwhc(np.concatenate([x[:, :, 0::2], x[:, :, 1::2]], -1), p["proj_W"], p["proj_b"])
    for c in range(3):
        h = _np_gated_conv(p, f"c{c}", h)
    return h


def _np_coupling_params(p, cond, context, blocks, heads, components):
    """The coupling network: (s, t) (N, H, W', C) and logits, means, log-scales (..., K)."""
    h = _np_conv_nwhc(cond, p["proj_in_W"], p["proj_in_b"])
    for b in range(blocks):
        h = _np_gated_conv(p, f"block{b}_conv", h, context, use_nin=True)
        h = _np_layernorm(p, f"block{b}_ln1", h)
        h = _np_gated_attn(p, f"block{b}_attn", h, p["pos_emb"], heads)
        h = _np_layernorm(p, f"block{b}_ln2", h)
    last = f"block{blocks - 1}_proj_out"
    h = _np_conv_nwhc(h, p[f"{last}_W"], p[f"{last}_b"])
    h = h.reshape(*h.shape[:3], cond.shape[-1], 2 + 3 * components)
    logits, means, logscales = np.split(h[..., 2:], 3, axis=-1)
    return np.tanh(h[..., 0]), h[..., 1], logits, means, np.maximum(logscales, -7.0)


def test_flax_dequantizer_converts_and_matches_numpy(tmp_path):
    """The cifar10 dequantiser at a small width: the hand-written reference tree converts with
    strict checks, and our layers reproduce numpy versions of the reference's layers."""
    channels, size, filters, components, heads, blocks = 3, 8, 8, 2, 2, 2
    rng = np.random.default_rng(0)
    shape_args = (channels, size, size, filters, components, blocks)
    tree = _reference_flowpp_tree(rng, *shape_args)
    tree_ema = _reference_flowpp_tree(np.random.default_rng(1), *shape_args)
    path = tmp_path / "checkpoint_6"
    path.write_bytes(_pack(_flax_state({"params": tree}, tree_ema, step=60000, ema_rate=0.99)))

    deq = FlowppDequantizer("cifar10", channels, size, filters, 4, components, heads, blocks).eval()
    state = convert_flax_dequantizer_checkpoint(path, deq)
    assert state["step"] == 60000 and state["ema"]["__decay__"] == pytest.approx(0.99)
    out = tmp_path / "deq.pth"
    checkpoints.save_atomic(state, out)
    deq.load_state_dict(checkpoints.load_checkpoint(out)["model"], strict=True)
    assert bool(deq.initialized)
    num_arrays = sum(len(module) for module in tree.values())
    assert num_arrays == len(list(deq.parameters()))

    def nhwc(x):
        """(N, C, H, W, ...) torch -> (N, H, W, C, ...) numpy."""
        return np.moveaxis(x.numpy(), 1, 3)

    def close(got, expected, **kwargs):
        np.testing.assert_allclose(nhwc(got), expected, rtol=1e-4, atol=1e-4, **kwargs)

    half = (2, size, size // 2, channels)
    x01 = rng.uniform(size=(2, size, size, channels))
    cond = rng.standard_normal(half)
    hidden = rng.standard_normal((2, size, size // 2, filters))
    wide = rng.standard_normal((2, size, size // 2, CONTEXT))
    p = tree["MixLogisticAttnCoupling_1"]
    coupling = deq.MixLogisticAttnCoupling_1

    with torch.no_grad():
        # one gated convolution of the context network (3x3 c1 and c2, read as NWHC), and the
        # whole context network: proj and three gated convolutions
        expected = _np_gated_conv(tree["ShallowProcessor_0"], "c1", wide)
        close(deq.ShallowProcessor_0.c1(_nchw(wide)), expected)
        context = _np_context(tree["ShallowProcessor_0"], x01)
        close(deq.context(_nchw(x01)), context)

        # a coupling's gated convolution with the context (1x1 a_proj and c2) and its attention
        expected = _np_gated_conv(p, "block0_conv", hidden, context, use_nin=True)
        close(coupling.block0_conv(_nchw(hidden), _nchw(context)), expected)
        expected = _np_gated_attn(p, "block1_attn", hidden, p["pos_emb"], heads)
        close(coupling.block1_attn(_nchw(hidden), coupling.pos_emb), expected)

        # the whole coupling network: s, t and the mixture parameters per element
        expected = _np_coupling_params(p, cond, context, blocks, heads, components)
        got = coupling.transform_params(_nchw(cond), _nchw(context))
        for name, e, g in zip(
            ("s", "t", "logits", "means", "logscales"), expected, got, strict=True
        ):
            close(g, e, err_msg=name)

        # actnorm (Norm) and the invertible 1x1 convolution (Pointwise) of both halves
        a, b = rng.standard_normal(half), rng.standard_normal(half)
        (norm_a, norm_b), _ = deq.Norm_2((_nchw(a), _nchw(b)))
        n = tree["Norm_2"]
        close(norm_a, a * n["norm0_g"] + n["norm0_b"])
        close(norm_b, b * n["norm1_g"] + n["norm1_b"])
        (mixed_a, mixed_b), _ = deq.Pointwise_3((_nchw(a), _nchw(b)))
        close(mixed_a, a @ tree["Pointwise_3"]["W0"])
        close(mixed_b, b @ tree["Pointwise_3"]["W1"])

    # the EMA weights come from params_ema, in the same layout
    ema_kernel = tree_ema["ShallowProcessor_0"]["proj_W"]
    np.testing.assert_array_equal(
        state["ema"]["ShallowProcessor_0.proj.W"].numpy(), ema_kernel.transpose(3, 2, 1, 0)
    )

    # a missing entry is named
    del tree["MixLogisticAttnCoupling_2"]["block1_attn_proj2_b"]
    path.write_bytes(_pack(_flax_state({"params": tree}, tree_ema)))
    with pytest.raises(ConversionError, match="MixLogisticAttnCoupling_2/block1_attn_proj2_b"):
        convert_flax_dequantizer_checkpoint(path, deq)


# ----------------------------------------------------------------------------------------------
# A checkpoint written by the paper's own Flax code (tests/data/convert/make_flax_fixture.py)

FIXTURE = Path(__file__).resolve().parent / "data" / "convert"


def test_real_flax_checkpoint_gives_the_flax_outputs(tmp_path):
    """score_flow's Flax NCSNpp (nf 4, ch_mult (1, 2), 8x8x3), serialised by flax itself."""
    model = NCSNpp(**dict(TINY_NCSNPP, nf=4, dropout=0.0)).eval()
    state = convert_flax_score_checkpoint(FIXTURE / "flax_ncsnpp_tiny.msgpack", model)
    assert state["step"] == 1300000
    io = np.load(FIXTURE / "flax_ncsnpp_tiny_io.npz")
    x, t = _nchw(io["x"]), torch.from_numpy(io["t"])

    model.load_state_dict(state["model"], strict=True)
    with torch.no_grad():
        got = model(x, t)
    np.testing.assert_allclose(got.numpy(), io["y"].transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-5)

    checkpoints.restore_ema_weights(model, state)
    with torch.no_grad():
        got = model(x, t)
    np.testing.assert_allclose(got.numpy(), io["y_ema"].transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "arch, widths",
    [
        ("cifar10", dict(num_filters=8, num_blocks=4, num_components=2, num_heads=2,
                         num_conv_blocks=2)),
        ("imagenet32", dict(num_filters=8, num_blocks=8, num_components=2, num_heads=2,
                            num_conv_blocks=1)),
    ],
)  # fmt: skip
def test_real_flax_dequantizer_gives_the_flax_outputs(arch, widths):
    """score_flow's Flax Flow++ dequantisers (8x8x3, tiny couplings, the reference's fixed-width
    context networks), initialised, perturbed and serialised by flax itself
    (tests/data/convert/make_flax_dequantizer_fixture.py): the converted weights map the same
    noise and images to the same u and log q(u | x) (the Flax network returns -log q)."""
    deq = FlowppDequantizer(arch, 3, 8, **widths).eval()
    state = convert_flax_dequantizer_checkpoint(FIXTURE / f"flax_flowpp_{arch}_tiny.msgpack", deq)
    assert state["step"] == 60000 and state["ema"]["__decay__"] == pytest.approx(0.99)
    io = np.load(FIXTURE / f"flax_flowpp_{arch}_tiny_io.npz")
    x01, noise = _nchw(io["x"]), _nchw(io["eps"])

    deq.load_state_dict(state["model"], strict=True)
    for suffix in ("", "_ema"):
        if suffix:
            checkpoints.restore_ema_weights(deq, state)
        with torch.no_grad():
            u, log_q = deq(x01, noise)
        np.testing.assert_allclose(
            u.numpy().transpose(0, 2, 3, 1), io[f"u{suffix}"], rtol=0, atol=5e-6
        )
        np.testing.assert_allclose(log_q.numpy(), -io[f"minus_log_q{suffix}"], rtol=0, atol=2e-3)
