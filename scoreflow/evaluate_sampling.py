"""Sampling driver: samples of a snapshot, their FID / IS / KID, training-time sample grids, and
the ``scoreflow fid-stats`` tool that makes reference statistics.

Samples of snapshot k go to ``<eval_dir>/samples_ckpt_<k>/`` in rounds of
``sampling.batch_size`` images (the last round takes the remainder of ``eval.num_samples``):

- ``samples_<r>.npz``: ``samples`` uint8 (n, C, H, W), ``nfe`` (score evaluations of the round),
  ``sampler`` (a description of the sampler and its settings);
- ``samples_<r>.png``: the round as an image grid;
- ``statistics_<r>.npz``: the round's Inception ``pool_3`` (n, 2048) and, with pytorch-fid's
  weights, ``logits`` (n, 1008), with ``network`` naming the network (recomputed if it
  changes).

Every file is written atomically, and a round whose file exists is not sampled again, so a
killed evaluation resumes where it stopped. The prior and step noise of round r come from a
generator seeded by (config.seed, k, r) alone, and rank q of a W-rank job takes the rounds
r = q, q + W, ...; the samples therefore do not depend on the number of ranks (on one device
type: CPU and CUDA generators draw different numbers).

FID and KID compare the samples' pool_3 features with reference statistics: ``eval.stats_file``
(an npz with ``mu`` and ``sigma`` and/or raw ``pool_3`` features, such as the official
``cifar10_stats.npz``); else, for CIFAR-10 and ImageNet, the official file where the reference
keeps it (``assets/stats/cifar10_stats.npz``, ``assets/stats/imagenet32_stats.npz``) if present;
else statistics of the data set's training split, computed once by the same network and cached
as ``<eval_dir>/data_stats_<dataset>_train_<network>.npz``. The
training split is the FID convention for CIFAR-10 (50,000 images), and it is the split the
official statistics files were made from. The Inception score needs logits, which only
pytorch-fid's weights provide (``eval.inception_file``); see :mod:`scoreflow.metrics`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from torch import Tensor, nn

from scoreflow import checkpoints, distributed, metrics, records
from scoreflow.sampling import ode_sample, pc_sample
from scoreflow.score import get_score_fn
from scoreflow.sde import SDE

__all__ = [
    "get_sampler",
    "sampler_description",
    "round_generator",
    "to_uint8",
    "run_sampling_eval",
    "snapshot_samples",
    "compute_data_statistics",
    "check_stats_file",
    "stats_main",
]

log = logging.getLogger(__name__)

SampleFn = Callable[[Callable[[Tensor, Tensor], Tensor], torch.Generator, torch.device], Any]


def sampler_description(config: ml_collections.ConfigDict) -> str:
    """One line naming the sampler of ``config.sampling`` and the settings that change samples."""
    s = config.sampling
    method = s.method.lower()
    if method == "ode":
        text = f"ode(dopri5, rtol={s.rtol:g}, atol={s.atol:g}"
    elif method == "pc":
        text = (
            f"pc({s.predictor}, {s.corrector}, snr={s.snr:g}, num_steps={s.num_steps}, "
            f"n_steps_each={s.n_steps_each}, probability_flow={bool(s.probability_flow)}"
        )
    else:
        raise ValueError(f"unknown sampling.method {s.method!r}: set it to ode or pc")
    denoise = "tweedie" if s.noise_removal else "none"
    return text + f", eps={s.smallest_time:g}, denoise={denoise})"


def get_sampler(
    config: ml_collections.ConfigDict, sde: SDE, shape: tuple[int, ...]
) -> Callable[..., tuple[Tensor, int]]:
    """``(score_fn, generator, device) -> (x, nfe)`` for the sampler of ``config.sampling``.

    ``shape`` is ``(batch, C, H, W)``; samples are in model space (apply the inverse scaler).
    """
    s = config.sampling
    sampler_description(config)  # validates the method name

    if s.method.lower() == "ode":

        def sample(score_fn, generator, device):
            return ode_sample(
                score_fn, sde, shape, eps=s.smallest_time, rtol=s.rtol, atol=s.atol,
                denoise=s.noise_removal, generator=generator, device=device,
            )  # fmt: skip

        return sample

    def sample(score_fn, generator, device):
        return pc_sample(
            score_fn, sde, shape, predictor=s.predictor.lower(), corrector=s.corrector.lower(),
            snr=s.snr, num_steps=s.num_steps, n_steps_each=s.n_steps_each,
            eps=s.smallest_time, denoise=s.noise_removal, generator=generator, device=device,
            probability_flow=s.probability_flow, show_progress=True,
        )  # fmt: skip

    return sample


def round_generator(
    seed: int, ckpt: int, round_index: int, device: torch.device
) -> torch.Generator:
    """A generator on ``device`` seeded by a hash of (seed, ckpt, round) alone."""
    state = np.random.SeedSequence([int(seed), int(ckpt) + 2**20, int(round_index)])
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return generator


def to_uint8(x: Tensor, inverse_scaler: Callable[[Tensor], Tensor]) -> np.ndarray:
    """Model-space samples -> uint8 (N, C, H, W): round(255 clip(inverse_scaler(x), 0, 1)).

    Rounding to the nearest level is unbiased; the reference truncates (``astype(uint8)`` of
    255 clip(x)), which darkens every pixel by half a level on average.
    """
    images = inverse_scaler(x).clamp(0.0, 1.0) * 255.0
    return images.round().to(torch.uint8).cpu().numpy()


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _sample_batch(config, sde: SDE, model: nn.Module, n: int, generator, device):
    """n samples as uint8 (n, C, H, W) and the NFE, model in eval mode under no_grad."""
    from scoreflow.factory import data_scaler

    shape = (n, config.data.num_channels, config.data.image_size, config.data.image_size)
    sample = get_sampler(config, sde, shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, nfe = sample(get_score_fn(sde, model), generator, device)
    finally:
        model.train(was_training)
    return to_uint8(x, data_scaler(config)[1]), int(nfe)


def snapshot_samples(
    config: ml_collections.ConfigDict,
    sde: SDE,
    model: nn.Module,
    step: int,
    workdir: str | os.PathLike,
    num_images: int = 64,
) -> Path | None:
    """Sample a grid of ``min(num_images, sampling.batch_size)`` images with ``model`` (pass the
    EMA weights) and write ``<workdir>/samples/iter_<step>/sample.png`` and ``sample.npz``
    (``samples`` uint8 (n, C, H, W)). Rank 0 only; returns the folder (None elsewhere)."""
    if not distributed.is_main():
        return None
    device = _device_of(model)
    n = max(1, min(num_images, config.sampling.batch_size))
    generator = round_generator(config.seed, -1, step, device)
    images, nfe = _sample_batch(config, sde, model, n, generator, device)
    folder = Path(workdir) / "samples" / f"iter_{step}"
    checkpoints.savez_atomic(folder / "sample.npz", samples=images, nfe=nfe)
    records.save_image_grid(images, folder / "sample.png")
    log.info("step %d: %d samples (NFE %d) in %s", step, n, nfe, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Reference statistics


def _network_tag(net: metrics.InceptionFeatures, inception_file: str) -> str:
    """Short name of the feature network, used to keep caches of different networks apart."""
    if not inception_file:
        return "tfport"
    digest = hashlib.sha1(str(Path(inception_file).resolve()).encode()).hexdigest()[:8]
    return f"{net.convention}-{digest}"


def compute_data_statistics(
    images: Tensor | np.ndarray,
    net: metrics.InceptionFeatures,
    batch_size: int = 100,
) -> dict[str, np.ndarray]:
    """``{"pool_3": (N, 2048) float32, "mu": (2048,), "sigma": (2048, 2048)}`` of uint8 images."""
    pool_3, _ = metrics.compute_inception_outputs(net, images, batch_size, show_progress=True)
    mu, sigma = metrics.feature_statistics(pool_3)
    return {"pool_3": pool_3.astype(np.float32), "mu": mu, "sigma": sigma}


def _network_file(inception_file: str) -> str:
    """The Inception weights in use: ``inception_file``, else the default TorchScript port."""
    return inception_file or str(metrics.default_inception_path())


def _check_stats_network(
    stats: dict[str, np.ndarray], path: Path, network: str, convention: str
) -> None:
    """Warn when a statistics file names another Inception network than the samples' one.

    Files are told apart by the weights' file name (the folder may differ between machines)
    and by the preprocessing convention; a file without a ``network`` entry is not checked.
    """
    if "network" not in stats:
        return
    theirs = str(stats["network"])
    their_convention = str(stats["convention"]) if "convention" in stats else convention
    if Path(theirs).name != Path(network).name or their_convention != convention:
        log.warning(
            "FID statistics %s were made with the Inception network %s, the samples' features "
            "with %s: FID and KID are then not comparable with published figures (make the "
            "statistics with the same network: scoreflow fid-stats --inception ...)",
            path,
            theirs,
            network,
        )


def check_stats_file(config: ml_collections.ConfigDict) -> None:
    """Raise FileNotFoundError if the sample metrics of ``config.eval`` need an
    ``eval.stats_file`` that does not exist (checked before an evaluation starts)."""
    evaluation = config.eval
    if evaluation.enable_sampling and evaluation.sample_metrics and evaluation.stats_file:
        _check_stats_path(Path(evaluation.stats_file))


def _check_stats_path(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics file {path} not found: download the official cifar10_stats.npz / "
            "imagenet32_stats.npz (see docs/sampling.md), make one with `scoreflow fid-stats`, "
            "or leave eval.stats_file empty to use the training split"
        )


def _load_stats_file(
    path: str | os.PathLike, network: str | None = None, convention: str | None = None
) -> dict[str, np.ndarray]:
    """mu, sigma (and pool_3 when present) of a statistics npz.

    With ``network`` (weights file of the samples' Inception network) and ``convention`` (its
    preprocessing, "tf" or "pytorch_fid"), a file made with another network draws a warning.
    """
    path = Path(path)
    _check_stats_path(path)
    with np.load(path) as data:
        stats = {k: data[k] for k in data.files}
    if "mu" not in stats or "sigma" not in stats:
        if "pool_3" not in stats:
            raise ValueError(f"{path} has neither mu/sigma nor pool_3 (keys: {sorted(stats)})")
        stats["mu"], stats["sigma"] = metrics.feature_statistics(stats["pool_3"])
    if network is not None and convention is not None:
        _check_stats_network(stats, path, network, convention)
    return stats


def _official_stats_path(config) -> Path | None:
    """``assets/stats/cifar10_stats.npz`` or ``imagenet<size>_stats.npz`` (relative to the
    working directory, where the reference keeps them), or None for other data sets."""
    name = config.data.dataset.lower()
    if name == "cifar10":
        return Path("assets/stats/cifar10_stats.npz")
    if name == "imagenet":
        return Path(f"assets/stats/imagenet{config.data.image_size}_stats.npz")
    return None


def _reference_statistics(
    config, net: metrics.InceptionFeatures, eval_dir: Path
) -> tuple[dict[str, np.ndarray], str]:
    """The reference statistics and where they came from: ``eval.stats_file``, else the official
    file at its reference location ``assets/stats/`` (CIFAR-10, ImageNet) if present, else the
    training split (computed once, cached in ``eval_dir``)."""
    network = _network_file(config.eval.inception_file)
    if config.eval.stats_file:
        stats = _load_stats_file(config.eval.stats_file, network, net.convention)
        return stats, str(config.eval.stats_file)
    official = _official_stats_path(config)
    if official is not None and official.is_file():
        log.info("FID reference statistics: %s", official)
        return _load_stats_file(official, network, net.convention), str(official)
    tag = _network_tag(net, config.eval.inception_file)
    cache = eval_dir / f"data_stats_{config.data.dataset}_train_{tag}.npz"
    if not cache.is_file():
        from scoreflow import data, factory

        train, _ = factory.get_datasets(config)
        log.info("computing Inception statistics of the training split (%d images)", len(train))
        stats = compute_data_statistics(data.dataset_images(train), net)
        checkpoints.savez_atomic(
            cache, **stats, network=np.array(network), convention=np.array(net.convention)
        )
    return _load_stats_file(cache, network, net.convention), str(cache)


# ----------------------------------------------------------------------------------------------
# Evaluation of a snapshot


def _load_round_npz(path: Path, sampler: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    if "sampler" in stored and str(stored["sampler"]) != sampler:
        raise ValueError(
            f"{path} was sampled with {stored['sampler']}, not {sampler}: use another "
            "--eval_folder or delete that folder"
        )
    return stored


def run_sampling_eval(
    config: ml_collections.ConfigDict,
    sde: SDE,
    model: nn.Module,
    eval_dir: str | os.PathLike,
    ckpt_id: int,
) -> dict[str, Any]:
    """Sample ``eval.num_samples`` images from ``model`` (its EMA weights) and score them.

    Resumable and rank-independent (see the module docstring). Returns ``{"num_samples",
    "sampling_nfe_mean", "sampler", "samples_dir", "fid", "kid", "kid_std", "inception_score",
    "inception_score_10_splits", "inception_network", "stats_source"}``; the metrics are None
    when no Inception network is installed (a warning says how to get one) and the Inception
    score is None without logits. The dict is the same on every rank.
    """
    evaluation, sampling = config.eval, config.sampling
    device = _device_of(model)
    sample_dir = Path(eval_dir) / f"samples_ckpt_{ckpt_id}"
    sampler = sampler_description(config)
    num_samples = int(evaluation.num_samples)
    batch = int(sampling.batch_size)
    if num_samples < 1 or batch < 1:
        raise ValueError("eval.num_samples and sampling.batch_size must be positive")
    num_rounds = math.ceil(num_samples / batch)
    my_rounds = list(range(distributed.rank(), num_rounds, distributed.world_size()))

    net = None
    if evaluation.sample_metrics:
        net = _inception_or_none(evaluation.inception_file, device)
    else:
        log.info("FID/IS/KID not computed (eval.sample_metrics=False)")
    tag = None if net is None else _network_tag(net, evaluation.inception_file)

    # Sampling rounds, skipping those already on disk.
    for r in records.progress(my_rounds, desc=f"sampling ckpt {ckpt_id}"):
        n = min(batch, num_samples - r * batch)
        npz = sample_dir / f"samples_{r}.npz"
        stats_path = sample_dir / f"statistics_{r}.npz"
        images = _load_round_npz(npz, sampler)["samples"] if npz.is_file() else None
        if images is not None and len(images) != n:
            log.info("round %d holds %d samples, not %d: sampling it again", r, len(images), n)
            images = None
            stats_path.unlink(missing_ok=True)
        if images is None:
            generator = round_generator(config.seed, ckpt_id, r, device)
            images, nfe = _sample_batch(config, sde, model, n, generator, device)
            checkpoints.savez_atomic(npz, samples=images, nfe=nfe, sampler=np.array(sampler))
            records.save_image_grid(images, sample_dir / f"samples_{r}.png")
            log.info("ckpt %d round %d/%d: %d samples, NFE %d", ckpt_id, r + 1, num_rounds, n, nfe)
        if net is not None and _stats_network(stats_path) != tag:
            pool_3, logits = metrics.compute_inception_outputs(net, images, batch_size=100)
            arrays = {"pool_3": pool_3.astype(np.float32), "network": np.array(tag)}
            if logits is not None:
                arrays["logits"] = logits.astype(np.float32)
            checkpoints.savez_atomic(stats_path, **arrays)
    distributed.barrier()

    result: dict[str, Any] | None = None
    if distributed.is_main():
        result = _score_rounds(config, net, sample_dir, num_rounds, sampler, Path(eval_dir))
    result = distributed.broadcast_object(result)
    distributed.barrier()
    return result  # type: ignore[return-value]


def _stats_network(path: Path) -> str | None:
    """The network tag stored in a round's statistics file (None if there is no file)."""
    if not path.is_file():
        return None
    with np.load(path) as stats:
        return str(stats["network"]) if "network" in stats.files else ""


def _inception_or_none(inception_file: str, device) -> metrics.InceptionFeatures | None:
    """The Inception network, or None (with a warning) when none is installed."""
    if inception_file:
        return metrics.load_inception(inception_file, device)  # a named file must exist
    try:
        return metrics.load_inception(None, device)
    except FileNotFoundError as error:
        log.warning("FID/IS/KID skipped: %s", error)
        return None


def _score_rounds(
    config, net, sample_dir: Path, num_rounds: int, sampler: str, eval_dir: Path
) -> dict[str, Any]:
    """Gather all rounds' NFE and features on rank 0 and compute FID, KID and IS."""
    nfes, counts, pools, logits = [], [], [], []
    for r in range(num_rounds):
        stored = _load_round_npz(sample_dir / f"samples_{r}.npz", sampler)
        nfes.append(int(stored["nfe"]))
        counts.append(len(stored["samples"]))
        if net is not None:
            with np.load(sample_dir / f"statistics_{r}.npz") as stats:
                pools.append(stats["pool_3"])
                if "logits" in stats.files:
                    logits.append(stats["logits"])
    result: dict[str, Any] = {
        "num_samples": int(sum(counts)),
        "sampling_nfe_mean": float(np.average(nfes, weights=counts)),
        "sampler": sampler,
        "samples_dir": str(sample_dir),
        "fid": None,
        "kid": None,
        "kid_std": None,
        "inception_score": None,
        "inception_score_10_splits": None,
        "inception_network": None,
        "stats_source": None,
    }
    if net is None:
        return result

    result["inception_network"] = _network_file(config.eval.inception_file)
    features = np.concatenate(pools).astype(np.float64)
    reference, source = _reference_statistics(config, net, eval_dir)
    result["stats_source"] = source
    mu, sigma = metrics.feature_statistics(features)
    result["fid"] = metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    if "pool_3" in reference:
        kid, kid_std = metrics.kernel_inception_distance(features, reference["pool_3"])
        result["kid"], result["kid_std"] = kid, kid_std
    if logits:
        all_logits = np.concatenate(logits)
        result["inception_score"] = metrics.inception_score(all_logits, splits=1)[0]
        if len(all_logits) >= 10:
            result["inception_score_10_splits"] = list(metrics.inception_score(all_logits, 10))
    else:
        log.warning("Inception score skipped: %s", metrics.NO_LOGITS_MESSAGE)
    log.info(
        "samples: FID %.3f, KID %s, IS %s over %d samples (%s; reference %s)",
        result["fid"],
        "n/a" if result["kid"] is None else f"{result['kid']:.5f}",
        "n/a" if result["inception_score"] is None else f"{result['inception_score']:.3f}",
        result["num_samples"],
        sampler,
        source,
    )
    return result


# ----------------------------------------------------------------------------------------------
# scoreflow fid-stats


def stats_main(argv: list[str]) -> int:
    """``scoreflow fid-stats --config CONFIG --split train|test --output FILE.npz
    [--inception FILE] [--data_root DIR] [--batch_size N] [--device D] [--max_images N]``.

    Writes ``pool_3`` (N, 2048) float32 features, their ``mu`` and ``sigma`` (float64), and the
    metadata ``dataset``, ``split``, ``num_images``, ``network`` (the Inception weights file) and
    ``convention`` (its preprocessing). Raises ValueError or FileNotFoundError with a one-line
    message for user mistakes.
    """
    records.setup_logging()
    parser = argparse.ArgumentParser(
        prog="scoreflow fid-stats",
        description="Inception pool_3 statistics of a data set, for FID/KID reference files.",
    )
    parser.add_argument("--config", required=True, help="experiment config file (.py)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--output", required=True, help="npz file to write")
    parser.add_argument("--inception", default="", help="Inception weights (default: TF port)")
    parser.add_argument("--data_root", default=None, help="overrides config.data.root")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max_images", type=int, default=0, help="use the first N (0: all)")
    args = parser.parse_args(argv)

    from scoreflow import data, factory

    config = factory.load_config_file(args.config)
    if args.data_root is not None:
        config.data.root = args.data_root
    output = Path(args.output)
    if output.suffix != ".npz":
        raise ValueError(f"--output must end in .npz, got {output}")
    device = distributed.default_device(args.device)
    net = metrics.load_inception(args.inception or None, device)

    try:
        train, test = factory.get_datasets(config)
    except FileNotFoundError as err:  # the loaders name the driver's flag; here it is another
        raise FileNotFoundError(str(err).replace("--config.data.root", "--data_root")) from err
    images = data.dataset_images(train if args.split == "train" else test)
    if args.max_images > 0:
        images = images[: args.max_images]
    network = _network_file(args.inception)
    log.info(
        "fid-stats: %d %s images of %s through %s",
        len(images),
        args.split,
        config.data.dataset,
        network,
    )
    stats = compute_data_statistics(images, net, batch_size=args.batch_size)
    checkpoints.savez_atomic(
        output,
        **stats,
        dataset=np.array(config.data.dataset),
        split=np.array(args.split),
        num_images=np.array(len(images)),
        network=np.array(network),
        convention=np.array(net.convention),
    )
    log.info("wrote %s (pool_3 %s, mu, sigma)", output, stats["pool_3"].shape)
    return 0
