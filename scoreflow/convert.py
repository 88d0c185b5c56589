"""Foreign checkpoints -> scoreflow training states.

Two published sources are read:

- **score_sde_pytorch** (PyTorch): a ``torch.save`` dict with ``model`` (state dict of the
  network wrapped in ``DataParallel``, so every key starts with ``module.``), ``ema``
  (``{"decay", "num_updates", "shadow_params"}``, the shadow a list in the order of the
  network's trainable parameters), ``optimizer`` and ``step``. Our :class:`NCSNpp` has the same
  parameter names, so only the prefix and the EMA list need translating.
- **score_flow** (the paper's JAX/Flax code): ``flax.serialization.to_bytes`` of its training
  state, a msgpack map ``{step, optimizer: {target: params, state}, lr, model_state, ema_rate,
  params_ema, rng}`` (the dequantiser's ``DeqState`` has ``ema_train_bpd``/``ema_eval_bpd``
  instead of ``model_state``). Arrays are msgpack extension objects (code 1) whose payload is
  itself msgpack of ``(shape, dtype name, raw C-order bytes)``; numpy scalars are code 3 with the
  same payload, of shape ``()``. They are decoded here with the ``msgpack`` package alone: Flax,
  JAX and TensorFlow are not needed.

score_flow's VP/subVP networks with the Fourier time embedding take t itself where ours (like
score_sde_pytorch's) take log sigma; they are refused with NotImplementedError.

The Flax parameter tree of the score network is derived from our module list: Flax names each
submodule ``<Class>_<k>``, counting per class in order of creation inside its parent, and the
creation order is the execution order that our ``all_modules`` list follows. Inside the tree
convolution kernels are HWIO (ours OIHW), dense kernels (in, out) (ours (out, in)), GroupNorm
has ``scale``/``bias`` of shape (C,) (older Flax: (1, 1, 1, C)) where we have ``weight``/``bias``,
and NIN layers keep ``W`` (in, out) and ``b``.

Every conversion is strict: a missing, unexpected or mis-shaped entry is an error that names it.
The result is our training-state dict ``{"model": state_dict, "ema": EMA state, "step": int}``,
loadable with :func:`scoreflow.checkpoints.load_checkpoint` and
:func:`scoreflow.checkpoints.restore_ema_weights`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scoreflow.nets.ncsnpp import (
    AttnBlock,
    Downsample,
    GaussianFourierProjection,
    NCSNpp,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
)
from scoreflow.sde import SDE, VESDE

log = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "read_flax_msgpack",
    "flax_score_params_to_state_dict",
    "flax_dequantizer_params_to_state_dict",
    "convert_flax_score_checkpoint",
    "convert_flax_dequantizer_checkpoint",
    "load_score_sde_pytorch_checkpoint",
    "convert_main",
]

_NDARRAY_EXT = 1
_COMPLEX_EXT = 2
_NPSCALAR_EXT = 3
_CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"
_LAYOUTS = ("conv", "conv_transposed", "dense", "vector", "hwc", "same")

# Flax class name of each of our modules in the score network's list
_FLAX_CLASS = {
    nn.Linear: "Dense",
    nn.Conv2d: "Conv",
    nn.GroupNorm: "GroupNorm",
    GaussianFourierProjection: "GaussianFourierProjection",
    ResnetBlockBigGAN: "ResnetBlockBigGANpp",
    ResnetBlockDDPM: "ResnetBlockDDPMpp",
    AttnBlock: "AttnBlockpp",
    Downsample: "Downsample",
    Upsample: "Upsample",
}


class ConversionError(ValueError):
    """A foreign checkpoint does not fit the network; the message names the entry."""


# ----------------------------------------------------------------------------------------------
# Flax msgpack files


def _decode_ndarray(data: bytes) -> np.ndarray:
    """The array of an extension payload, msgpack of ``(shape, dtype name, C-order bytes)``."""
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    try:
        dtype = np.dtype(dtype_name)
    except TypeError as err:
        raise ConversionError(f"array of unsupported dtype {dtype_name!r} in the file") from err
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _decode_ext(code: int, data: bytes) -> Any:
    import msgpack

    if code == _NDARRAY_EXT:
        return _decode_ndarray(data)
    if code == _NPSCALAR_EXT:  # written as a 0-d array
        return _decode_ndarray(data)[()]
    if code == _COMPLEX_EXT:
        real, imag = msgpack.unpackb(data, raw=False)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(tree: Any) -> Any:
    """Reassemble arrays that Flax split into chunks ({"__msgpack_chunked_array__": ...})."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED_ARRAY_KEY):
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate([c.reshape(-1) for c in chunks]).reshape(tree["shape"])
    return {key: _unchunk(value) for key, value in tree.items()}


def read_flax_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    """The nested dict that ``flax.serialization.to_bytes`` wrote to ``path``.

    Leaves are numpy arrays (read-only views of the file's bytes), Python numbers and strings.
    Raises FileNotFoundError for a missing file and ConversionError for one that is not a
    Flax msgpack map.
    """
    import msgpack

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        tree = msgpack.unpackb(
            path.read_bytes(), ext_hook=_decode_ext, raw=False, strict_map_key=False
        )
    except ConversionError:
        raise
    except Exception as err:  # msgpack raises several types for foreign or truncated data
        raise ConversionError(
            f"{path} is not a Flax msgpack checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(tree, dict):
        raise ConversionError(f"{path} does not hold a Flax state (a msgpack map)")
    return _unchunk(tree)


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def _to_torch(array: Any, layout: str, target: Tensor, name: str, flax_name: str) -> Tensor:
    """Convert one Flax array to the layout and shape of ``target`` (errors name the entry).

    Layouts: "conv" HWIO -> OIHW (a 2-D (I, O) kernel becomes a 1x1 OIHW one);
    "conv_transposed" (kW, kH, I, O) -> OIHW, for kernels that the reference applies to images
    read as NWHC (its Flow++ convolutions), so that their first spatial axis runs along the
    width; "dense" (I, O) -> (O, I) or (O, I, 1, 1); "vector" any (1, ..., 1, C) -> (C,);
    "hwc" (H, W, C) -> (C, H, W); "same" unchanged.
    """
    if layout not in _LAYOUTS:
        raise ConversionError(f"unknown parameter layout {layout!r} for {name}")
    if not isinstance(array, np.ndarray):
        raise ConversionError(f"Flax entry {flax_name} (for {name}) is not an array")
    value = torch.from_numpy(np.array(array, dtype=np.float32))
    if layout == "conv_transposed" and value.dim() == 4:
        value = value.permute(3, 2, 1, 0)
    elif layout in ("conv", "dense", "conv_transposed"):
        if value.dim() == 4:
            value = value.permute(3, 2, 0, 1)
        elif value.dim() == 2:
            value = value.t()
            if target.dim() == 4:
                value = value[:, :, None, None]
    elif layout == "vector":
        if value.dim() >= 1 and all(s == 1 for s in value.shape[:-1]):
            value = value.reshape(-1)
    elif layout == "hwc" and value.dim() == 3:
        value = value.permute(2, 0, 1)
    if tuple(value.shape) != tuple(target.shape):
        raise ConversionError(
            f"Flax entry {flax_name} has shape {tuple(array.shape)}, which does not give the "
            f"shape {tuple(target.shape)} of {name}"
        )
    return value.contiguous().to(target.dtype)


def _unwrap_params(tree: dict[str, Any]) -> dict[str, Any]:
    """Parameter trees are stored bare (score model) or as variables {"params": ...} (deq)."""
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        return tree["params"]
    return tree


# ----------------------------------------------------------------------------------------------
# Score network


def _score_key_map(model: NCSNpp) -> dict[str, tuple[tuple[str, ...], str]]:
    """Our parameter name -> (Flax path, layout) for the score network."""
    leaf_names = {
        nn.Conv2d: {"weight": ("kernel", "conv"), "bias": ("bias", "same")},
        nn.Linear: {"weight": ("kernel", "dense"), "bias": ("bias", "same")},
        nn.GroupNorm: {"weight": ("scale", "vector"), "bias": ("bias", "vector")},
    }
    counters: dict[str, int] = defaultdict(int)
    mapping = {}
    for index, module in enumerate(model.all_modules):
        flax_class = _FLAX_CLASS.get(type(module))
        if flax_class is None:
            raise ConversionError(f"no Flax counterpart for {type(module).__name__}")
        flax_module = f"{flax_class}_{counters[flax_class]}"
        counters[flax_class] += 1
        for name, _ in module.named_parameters():
            *owner_path, leaf = name.split(".")
            owner = module.get_submodule(".".join(owner_path)) if owner_path else module
            flax_leaf, layout = leaf_names.get(type(owner), {}).get(leaf, (leaf, "same"))
            mapping[f"all_modules.{index}.{name}"] = ((flax_module, *owner_path, flax_leaf), layout)
    return mapping


def _check_time_embedding(model: NCSNpp, sde: SDE | None) -> None:
    """Refuse a network whose score_flow time embedding is not ours (see the module docstring)."""
    if model.embedding_type == "fourier" and not isinstance(sde, VESDE):
        raise NotImplementedError(
            "score_flow's Fourier embedding of the VP/subVP time takes t itself, ours log sigma, "
            "so its weights would give another function: only positional-embedding networks and "
            "Fourier ones of the VE SDE (pass sde=VESDE(...)) convert"
        )


def flax_score_params_to_state_dict(
    params: dict[str, Any], model: NCSNpp, sde: SDE | None = None
) -> dict[str, Tensor]:
    """Our state dict (``sigmas`` buffer included) from a score_flow NCSNpp parameter tree.

    ``sde`` is the checkpoint's SDE; it is needed (and must be a VESDE) only for a network with
    the Fourier time embedding, which raises NotImplementedError otherwise.
    Strict: raises ConversionError naming any parameter that is missing from the tree, any tree
    entry that no parameter uses, and any shape that does not fit. The blocks' ``Dense_0``
    layers of an unconditional network, which Flax does not create, are set to zero.
    """
    _check_time_embedding(model, sde)
    flat = _flatten(_unwrap_params(params))
    target = model.state_dict()
    state: dict[str, Tensor] = {}
    missing = []
    for name, (path, layout) in _score_key_map(model).items():
        flax_name = "/".join(path)
        if path not in flat:
            if not model.conditional and ".Dense_0." in name:
                state[name] = torch.zeros_like(target[name])
                continue
            missing.append(f"{flax_name} (for {name})")
            continue
        state[name] = _to_torch(flat.pop(path), layout, target[name], name, flax_name)
    if missing:
        raise ConversionError(f"the Flax parameters lack {len(missing)} entries: {missing[:4]}")
    if flat:
        unexpected = ["/".join(p) for p in flat]
        raise ConversionError(
            f"the Flax parameters have {len(unexpected)} entries that the network does not "
            f"use: {unexpected[:4]} (is --config the checkpoint's config?)"
        )
    for name, buffer in model.named_buffers():
        state[name] = buffer.detach().clone()
    return state


def _training_state(
    model: nn.Module, weights: dict[str, Tensor], ema: dict[str, Tensor], step: int, decay: float
) -> dict[str, Any]:
    """Our training-state dict; parameters absent from ``ema`` are taken from ``weights``."""
    ema_state: dict[str, Any] = {
        name: ema.get(name, weights[name]).clone() for name, _ in model.named_parameters()
    }
    ema_state["__decay__"] = float(decay)
    return {"model": weights, "ema": ema_state, "step": int(step)}


def _flax_state_parts(tree: dict[str, Any], path: Path) -> tuple[Any, Any, int, float | None]:
    """(params, ema params, step, ema rate) of a Flax training state, or of a bare tree."""
    if "optimizer" in tree or "params_ema" in tree:
        for key in ("optimizer", "params_ema"):
            if key not in tree:
                raise ConversionError(f"{path}: the Flax training state has no {key!r} entry")
        if not isinstance(tree["optimizer"], dict) or "target" not in tree["optimizer"]:
            raise ConversionError(f"{path}: the Flax optimizer state has no 'target' entry")
        rate = tree.get("ema_rate")
        return tree["optimizer"]["target"], tree["params_ema"], int(tree.get("step", 0)), rate
    log.warning("%s holds a bare parameter tree: its weights are used as the EMA too", path)
    return tree, tree, 0, None


def convert_flax_score_checkpoint(
    path: str | os.PathLike, model: NCSNpp, sde: SDE | None = None
) -> dict[str, Any]:
    """Our training state ``{"model", "ema", "step"}`` from a score_flow score-model checkpoint.

    ``model`` is an :class:`NCSNpp` built from the checkpoint's config; its ``sigmas`` buffer is
    taken over (the Flax code computes the noise scales instead of storing them). ``sde``, the
    checkpoint's SDE, matters only for the Fourier time embedding: NotImplementedError unless
    it is a VESDE (checked before the file is read).
    """
    _check_time_embedding(model, sde)
    path = Path(path)
    params, params_ema, step, rate = _flax_state_parts(read_flax_msgpack(path), path)
    weights = flax_score_params_to_state_dict(params, model, sde)
    ema = flax_score_params_to_state_dict(params_ema, model, sde)
    state = _training_state(model, weights, ema, step, 0.9999 if rate is None else rate)
    log.info("converted the Flax score model of %s (step %d)", path, state["step"])
    return state


# ----------------------------------------------------------------------------------------------
# Flow++ dequantiser


def flax_dequantizer_params_to_state_dict(
    params: dict[str, Any], dequantizer: nn.Module
) -> dict[str, Tensor]:
    """Our dequantiser state dict from a score_flow Flow++ parameter tree (strict).

    Uses ``dequantizer.flax_key_map()`` (our name -> ((Flax module, Flax parameter), layout)).
    The ``initialized`` buffer is set, since the Flax weights already include the data-dependent
    initialisation.
    """
    flat = _flatten(_unwrap_params(params))
    target = dequantizer.state_dict()
    layouts = {"layernorm": "vector"}
    state: dict[str, Tensor] = {}
    missing = []
    for name, (path, layout) in dequantizer.flax_key_map().items():
        flax_name = "/".join(path)
        if tuple(path) not in flat:
            missing.append(f"{flax_name} (for {name})")
            continue
        value = flat.pop(tuple(path))
        state[name] = _to_torch(value, layouts.get(layout, layout), target[name], name, flax_name)
    if missing:
        raise ConversionError(f"the Flax parameters lack {len(missing)} entries: {missing[:4]}")
    if flat:
        unexpected = ["/".join(p) for p in flat]
        raise ConversionError(
            f"the Flax parameters have {len(unexpected)} entries that the dequantiser does not "
            f"use: {unexpected[:4]} (is --config the checkpoint's config?)"
        )
    for name, buffer in dequantizer.named_buffers():
        state[name] = torch.ones_like(buffer) if name == "initialized" else buffer.clone()
    return state


def convert_flax_dequantizer_checkpoint(
    path: str | os.PathLike, dequantizer: nn.Module
) -> dict[str, Any]:
    """Our training state ``{"model", "ema", "step"}`` from a score_flow dequantiser checkpoint
    (``<run>/flowpp_dequantizer/checkpoints/checkpoint_<k>``)."""
    path = Path(path)
    params, params_ema, step, rate = _flax_state_parts(read_flax_msgpack(path), path)
    weights = flax_dequantizer_params_to_state_dict(params, dequantizer)
    ema = flax_dequantizer_params_to_state_dict(params_ema, dequantizer)
    state = _training_state(dequantizer, weights, ema, step, 0.99 if rate is None else rate)
    log.info("converted the Flax Flow++ dequantiser of %s (step %d)", path, state["step"])
    return state


# ----------------------------------------------------------------------------------------------
# score_sde_pytorch


def load_score_sde_pytorch_checkpoint(
    path: str | os.PathLike, model: NCSNpp | None = None
) -> dict[str, Any]:
    """Our training state ``{"model", "ema", "step"}`` from a score_sde_pytorch checkpoint.

    The file is read with ``torch.load(weights_only=True)``. The ``module.`` prefix of the
    DataParallel wrapper is removed; the EMA's ``shadow_params`` list is matched, in order, to
    the trainable parameters (the frozen Fourier ``W`` has no EMA copy; its weights are used).
    With ``model`` (an :class:`NCSNpp` of the checkpoint's config) every key and shape is checked
    and a missing ``sigmas`` buffer is taken from it; without it the trainable parameters are
    taken to be every entry but ``sigmas`` and a Fourier ``all_modules.0.W``.
    Raises FileNotFoundError or ConversionError naming the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower():
            why = "cannot be read without running pickled code (weights_only=True)"
        else:
            why = "is not a PyTorch checkpoint that torch.load can read"
        raise ConversionError(f"{path} {why}: {first}") from err
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConversionError(f"{path} is not a score_sde_pytorch checkpoint (no 'model' entry)")

    weights = {k.removeprefix("module."): v for k, v in raw["model"].items()}
    if model is not None:
        target = model.state_dict()
        if "sigmas" not in weights and "sigmas" in target:
            weights["sigmas"] = target["sigmas"].clone()
        missing = [k for k in target if k not in weights]
        unexpected = [k for k in weights if k not in target]
        if missing or unexpected:
            raise ConversionError(
                f"{path} does not fit the network: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]} (is --config the checkpoint's config?)"
            )
        for key, value in target.items():
            if tuple(weights[key].shape) != tuple(value.shape):
                raise ConversionError(
                    f"{path}: {key} has shape {tuple(weights[key].shape)}, the network expects "
                    f"{tuple(value.shape)}"
                )
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    else:
        trainable = [k for k in weights if k != "sigmas" and k != "all_modules.0.W"]

    ema_raw = raw.get("ema")
    if not isinstance(ema_raw, dict) or "shadow_params" not in ema_raw:
        raise ConversionError(f"{path} has no EMA entry with 'shadow_params'")
    shadow = list(ema_raw["shadow_params"])
    if len(shadow) != len(trainable):
        raise ConversionError(
            f"{path}: the EMA holds {len(shadow)} tensors but the network has "
            f"{len(trainable)} trainable parameters"
        )
    ema = {}
    for name, value in zip(trainable, shadow, strict=True):
        if tuple(value.shape) != tuple(weights[name].shape):
            raise ConversionError(
                f"{path}: EMA tensor for {name} has shape {tuple(value.shape)}, the weights "
                f"{tuple(weights[name].shape)}"
            )
        ema[name] = value
    ema_state: dict[str, Any] = dict(ema)
    if model is not None:
        for name, _ in model.named_parameters():
            ema_state.setdefault(name, weights[name].clone())
    elif "all_modules.0.W" in weights:
        ema_state["all_modules.0.W"] = weights["all_modules.0.W"].clone()
    ema_state["__decay__"] = float(ema_raw.get("decay", 0.9999))
    step = raw.get("step", 0)
    step = int(step.item()) if isinstance(step, Tensor) else int(step)
    log.info("loaded the score_sde_pytorch checkpoint %s (step %d)", path, step)
    return {"model": weights, "ema": ema_state, "step": step}


# ----------------------------------------------------------------------------------------------
# Command line


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError (one line) instead of exiting."""

    def error(self, message: str):
        raise ValueError(f"convert: {message}")


def convert_main(argv: list[str]) -> int:
    """``scoreflow convert --kind score|deq|score_sde_pytorch --input FILE --output FILE
    --config CONFIG_FILE``: write the foreign checkpoint FILE as our training state.

    The config names the architecture (the file the checkpoint was trained with, e.g.
    configs/vp/cifar10_ddpmpp_continuous.py). Logs what it reads and writes to the console.
    Returns 0; user mistakes raise ValueError or FileNotFoundError with a one-line message, an
    unsupported checkpoint NotImplementedError.
    """
    from scoreflow import checkpoints, factory, records

    records.setup_logging()
    parser = _ArgumentParser(
        prog="scoreflow convert",
        description="Convert a published checkpoint into a scoreflow training state.",
    )
    parser.add_argument(
        "--kind",
        required=True,
        choices=("score", "deq", "score_sde_pytorch"),
        help="score: score_flow Flax score model; deq: score_flow Flax Flow++ dequantiser; "
        "score_sde_pytorch: PyTorch checkpoint of score_sde_pytorch",
    )
    parser.add_argument("--input", required=True, help="the published checkpoint file")
    parser.add_argument("--output", required=True, help="where to write our checkpoint (.pth)")
    parser.add_argument("--config", required=True, help="config file of the checkpoint's model")
    args = parser.parse_args(argv)

    config = factory.load_config_file(args.config)
    log.info("convert: %s checkpoint %s, architecture of %s", args.kind, args.input, args.config)
    if args.kind == "deq":
        network = factory.get_dequantizer(config)
        state = convert_flax_dequantizer_checkpoint(args.input, network)
    else:
        network = factory.get_model(config)
        if args.kind == "score":
            state = convert_flax_score_checkpoint(args.input, network, factory.get_sde(config))
        else:
            state = load_score_sde_pytorch_checkpoint(args.input, network)
    num_params = sum(p.numel() for p in network.parameters())
    out = checkpoints.save_atomic(state, args.output)
    log.info("wrote %s (step %d, %d parameters)", out, state["step"], num_params)
    return 0
