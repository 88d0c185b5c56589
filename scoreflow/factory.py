"""Build the objects of an experiment from its ml_collections config.

This is the only module below the drivers that reads a config: everything it builds (the SDE, the
score network, the dequantiser, the data sets) takes plain arguments, so that a researcher can
construct the same objects without a config.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections
import torch
from torch import Tensor

from scoreflow.sde import SDE, VESDE, VPSDE, SubVPSDE

if TYPE_CHECKING:
    from scoreflow.data import ImageDataset
    from scoreflow.nets.flowpp import FlowppDequantizer
    from scoreflow.nets.ncsnpp import NCSNpp

Scaler = Callable[[Tensor], Tensor]

__all__ = [
    "ConfigError",
    "load_config_file",
    "check_config",
    "get_sde",
    "get_model",
    "get_dequantizer",
    "get_datasets",
    "data_scaler",
]


class ConfigError(ValueError):
    """A config value is unknown or incompatible with another; the message says how to fix it."""


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of the ml_collections config file ``path`` (a Python file).

    Raises FileNotFoundError for a missing file and ValueError for one without get_config().
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    spec = importlib.util.spec_from_file_location(f"_scoreflow_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} has no get_config() function")
    return module.get_config()


def get_sde(config: ml_collections.ConfigDict) -> SDE:
    """The forward SDE named by ``training.sde`` (vpsde, subvpsde, vesde)."""
    name = config.training.sde.lower()
    model = config.model
    if name == "vpsde":
        return VPSDE(model.beta_min, model.beta_max)
    if name == "subvpsde":
        return SubVPSDE(model.beta_min, model.beta_max)
    if name == "vesde":
        return VESDE(model.sigma_min, model.sigma_max)
    raise ConfigError(
        f"unknown SDE {config.training.sde!r}: "
        "set --config.training.sde to vpsde, subvpsde or vesde"
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject settings that cannot work (here, or together), with a message that names the fix."""
    training = config.training
    sde = get_sde(config)
    _check_device(config.device)
    if not 0.0 < training.smallest_time < 1.0:
        raise ConfigError(
            f"training.smallest_time (eps) must lie in (0, 1), the span of the SDE's time, got "
            f"{training.smallest_time}"
        )
    if not 0.0 < config.data.test_fraction < 1.0:
        raise ConfigError(
            f"data.test_fraction must lie in (0, 1), got {config.data.test_fraction}: training "
            "and evaluation need held-out images"
        )
    sizes = {
        "model.nf": config.model.nf,
        "model.num_res_blocks": config.model.num_res_blocks,
        "data.image_size": config.data.image_size,
        "data.num_channels": config.data.num_channels,
        "deq.batch_size": config.deq.batch_size,
        "deq.num_filters": config.deq.num_filters,
        "deq.num_blocks": config.deq.num_blocks,
        "deq.num_components": config.deq.num_components,
        "deq.num_heads": config.deq.num_heads,
        "deq.num_conv_blocks": config.deq.num_conv_blocks,
    }
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    ch_mult = tuple(config.model.ch_mult)
    if not ch_mult or not all(isinstance(m, int) and m >= 1 for m in ch_mult):
        raise ConfigError(
            f"model.ch_mult must be a non-empty list of positive integer channel multipliers, "
            f"got {ch_mult}"
        )
    if training.importance_weighting and not training.likelihood_weighting:
        raise ConfigError(
            "training.importance_weighting=True needs training.likelihood_weighting=True "
            "(importance sampling of t is a variance reduction of the likelihood weighting)"
        )
    if training.importance_weighting and training.sde.lower() == "vesde":
        raise ConfigError(
            "importance sampling of t is defined for vpsde and subvpsde only; under vesde set "
            "--config.training.importance_weighting=False"
        )
    if not training.continuous:
        raise ConfigError(
            "only continuous-time training is implemented: set --config.training.continuous=True"
        )
    from scoreflow.likelihood import DIVERGENCES, ERROR_NORMS, TIME_VARIABLES

    choices = {
        "divergence": DIVERGENCES,
        "time_variable": TIME_VARIABLES,
        "error_norm": ERROR_NORMS,
    }
    for name, allowed in choices.items():
        if config.eval[name] not in allowed:
            raise ConfigError(
                f"eval.{name} must be one of {', '.join(allowed)}, got {config.eval[name]!r}"
            )
    if config.eval.bpd_dataset not in ("train", "test"):
        raise ConfigError(
            f"eval.bpd_dataset must be train or test, got {config.eval.bpd_dataset!r}"
        )
    if training.batch_size < 1:
        raise ConfigError("training.batch_size must be at least 1")
    _check_eval_sizes(config.eval)
    if training.snapshot_sampling or config.eval.enable_sampling:
        _check_sampling(config.sampling, sde)
    if config.eval.enable_loss:
        raise ConfigError(
            "eval.enable_loss (the DSM loss of every snapshot on the test split) is not "
            "implemented; training records the EMA weights' loss on a held-out batch every "
            "training.eval_freq steps (curve.csv, TensorBoard). Set --config.eval.enable_loss=False"
        )
    if not config.eval.dsm:
        raise ConfigError(
            "eval.dsm=False (the bound by sliced score matching) is not implemented; the bound "
            "uses denoising score matching: set --config.eval.dsm=True"
        )


def _check_eval_sizes(evaluation: ml_collections.ConfigDict) -> None:
    for name in ("batch_size", "num_repeats", "num_samples"):
        if evaluation[name] < 1:
            raise ConfigError(f"eval.{name} must be at least 1, got {evaluation[name]}")
    if evaluation.max_images < 0:
        raise ConfigError(
            f"eval.max_images must be 0 (every image of the split) or a positive count, got "
            f"{evaluation.max_images}"
        )


def _check_sampling(sampling: ml_collections.ConfigDict, sde: SDE) -> None:
    """The sampler settings, checked before a run that samples (training.snapshot_sampling,
    eval.enable_sampling) starts rather than when it first samples."""
    from scoreflow.sampling import check_pc_settings

    method = sampling.method.lower()
    if method not in ("ode", "pc"):
        raise ConfigError(f"unknown sampling.method {sampling.method!r}: set it to ode or pc")
    if sampling.batch_size < 1:
        raise ConfigError(f"sampling.batch_size must be at least 1, got {sampling.batch_size}")
    if method == "ode":
        if not 0.0 < sampling.smallest_time < sde.T:
            raise ConfigError(
                f"sampling.smallest_time must lie in (0, {sde.T:g}), got {sampling.smallest_time}"
            )
        if sampling.rtol <= 0 or sampling.atol <= 0:
            raise ConfigError(
                f"sampling.rtol and sampling.atol must be positive, got {sampling.rtol} and "
                f"{sampling.atol}"
            )
        return
    try:
        check_pc_settings(
            sde, sampling.predictor.lower(), sampling.corrector.lower(), sampling.num_steps,
            sampling.smallest_time, sampling.n_steps_each, sampling.probability_flow,
        )  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"sampling (method pc): {err}") from err


def _check_device(name: str) -> None:
    """Reject a ``device`` setting that torch cannot parse, or a GPU this torch cannot use."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"unknown device {name!r}: set --config.device to auto, cpu, cuda or cuda:N"
        ) from err
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ConfigError(
            f"--config.device={name}, but this torch ({torch.__version__}) {why}: set "
            "--config.device=cpu (or auto)"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--config.device={name}, but only {torch.cuda.device_count()} GPU(s) are visible"
        )


def get_model(config: ml_collections.ConfigDict) -> NCSNpp:
    """The score network of ``config.model`` (DDPM++ / NCSN++ "ncsnpp")."""
    from scoreflow.nets.ncsnpp import NCSNpp

    model = config.model
    if model.name != "ncsnpp":
        raise ConfigError(f"unknown model {model.name!r}: only 'ncsnpp' (DDPM++) is available")
    if model.fir or model.progressive != "none" or model.progressive_input != "none":
        raise ConfigError(
            "FIR resampling and progressive growing paths are not implemented: set model.fir=False "
            "and model.progressive=model.progressive_input='none' (the DDPM++ settings)"
        )
    return NCSNpp(
        image_size=config.data.image_size,
        num_channels=config.data.num_channels,
        nf=model.nf,
        ch_mult=tuple(model.ch_mult),
        num_res_blocks=model.num_res_blocks,
        attn_resolutions=tuple(model.attn_resolutions),
        dropout=model.dropout,
        resamp_with_conv=model.resamp_with_conv,
        conditional=model.conditional,
        skip_rescale=model.skip_rescale,
        resblock_type=model.resblock_type,
        init_scale=model.init_scale,
        embedding_type=model.embedding_type,
        fourier_scale=model.fourier_scale,
        scale_by_sigma=model.scale_by_sigma,
        centered=config.data.centered,
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
        num_scales=model.num_scales,
    )


def get_dequantizer(config: ml_collections.ConfigDict) -> FlowppDequantizer:
    """The Flow++ variational dequantiser of ``config.deq`` for the data's image shape."""
    from scoreflow.nets.flowpp import FlowppDequantizer

    deq = config.deq
    return FlowppDequantizer(
        arch=deq.arch,
        num_channels=config.data.num_channels,
        image_size=config.data.image_size,
        num_filters=deq.num_filters,
        num_blocks=deq.num_blocks,
        num_components=deq.num_components,
        num_heads=deq.num_heads,
        num_conv_blocks=deq.num_conv_blocks,
        dropout=deq.dropout,
    )


def get_datasets(config: ml_collections.ConfigDict) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` uint8 image data sets of ``config.data`` (see :mod:`scoreflow.data`)."""
    from scoreflow import data

    return data.get_datasets(
        name=config.data.dataset,
        root=config.data.root,
        image_size=config.data.image_size,
        num_channels=config.data.num_channels,
        imagenet_format=config.data.imagenet_format,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
    )


def data_scaler(config: ml_collections.ConfigDict) -> tuple[Scaler, Scaler]:
    """(scaler, inverse_scaler): [0, 1] data to model space ([-1, 1] when centred) and back."""
    if config.data.centered:
        return (lambda x: x * 2.0 - 1.0), (lambda x: (x + 1.0) / 2.0)
    return (lambda x: x), (lambda x: x)
