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
    _load_config,
    convert_flax_dequantizer_checkpoint,
    convert_flax_score_checkpoint,
    convert_main,
    load_score_sde_pytorch_checkpoint,
)
from scoreflow.nets.ncsnpp import NCSNpp

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "small" / "digits_vp.py"


def _tiny_config():
    return _load_config(str(CONFIG_FILE))


# ----------------------------------------------------------------------------------------------
# A synthetic score_flow checkpoint, written the way flax.serialization.to_bytes writes one


def _pack(tree):
    """msgpack bytes of a nested dict whose array leaves use Flax's extension type 1."""

    def default(obj):
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")))
            return msgpack.ExtType(1, payload)
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=default)


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


def test_convert_main_writes_a_loadable_training_state(tmp_path):
    path = tmp_path / "checkpoint_26"
    path.write_bytes(_pack(_flax_state(_tiny_tree(0), _tiny_tree(1))))
    out = tmp_path / "ours" / "checkpoint_26.pth"
    argv = ["--kind", "score", "--input", str(path), "--output", str(out)]
    assert convert_main([*argv, "--config", str(CONFIG_FILE)]) == 0
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


# ----------------------------------------------------------------------------------------------
# Flow++ dequantiser


def test_flax_dequantizer_checkpoint_round_trip(tmp_path):
    """Our weights, written in the Flax layouts the dequantiser names, come back unchanged."""
    config = _tiny_config()
    torch.manual_seed(0)
    source = factory.get_dequantizer(config)
    to_flax = {
        "conv": lambda v: v.permute(2, 3, 1, 0),  # OIHW -> HWIO
        "conv_transposed": lambda v: v.permute(3, 2, 1, 0),  # OIHW -> WHIO
        "dense": lambda v: v[:, :, 0, 0].t(),  # (O, I, 1, 1) -> (I, O)
        "hwc": lambda v: v.permute(1, 2, 0),
        "layernorm": lambda v: v.reshape(1, 1, 1, -1),
        "same": lambda v: v,
    }
    weights = dict(source.named_parameters())
    tree: dict = {}
    for name, ((module, leaf), layout) in source.flax_key_map().items():
        value = to_flax[layout](weights[name].detach() + 0.5).numpy().astype(np.float32)
        tree.setdefault(module, {})[leaf] = np.ascontiguousarray(value)
    path = tmp_path / "checkpoint_6"
    path.write_bytes(_pack(_flax_state({"params": tree}, {"params": tree}, ema_rate=0.99)))

    target = factory.get_dequantizer(config)
    state = convert_flax_dequantizer_checkpoint(path, target)
    target.load_state_dict(state["model"], strict=True)
    assert bool(target.initialized)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p, weights[name] + 0.5, msg=name)

    module, leaf = next(iter(source.flax_key_map().values()))[0]
    del tree[module][leaf]
    path.write_bytes(_pack(_flax_state({"params": tree}, {"params": tree})))
    with pytest.raises(ConversionError, match=f"{module}/{leaf}"):
        convert_flax_dequantizer_checkpoint(path, factory.get_dequantizer(config))


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
