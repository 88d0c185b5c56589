"""Evaluation driver (``--mode eval``): bits/dim of training snapshots, resumable, and samples.

For every snapshot ``<workdir>/checkpoints/checkpoint_<k>.pth`` with
``eval.begin_ckpt <= k <= eval.end_ckpt`` (its EMA weights), this driver

1. (``eval.enable_bpd``) computes the bits/dim of every image of the ``eval.bpd_dataset`` split
   (or of its first ``eval.max_images``), ``eval.num_repeats`` times, by the probability-flow
   ODE (:func:`scoreflow.likelihood.ode_likelihood`) or, with ``eval.bound``, by the variational
   bound (:func:`scoreflow.bound.negative_elbo`), on uniformly dequantised images or, with
   ``eval.dequantizer``, on images dequantised by the trained Flow++ dequantiser (whose
   -log q(u | x) is added);
2. (``eval.enable_sampling``) runs ``scoreflow.evaluate_sampling.run_sampling_eval`` and merges
   its figures into the snapshot's entry of the report.

Outputs in ``<workdir>/<eval_folder>/``:

- ``bpd_ckpt_<k>_<method>_<dequantization>.npz`` (method ``ode`` or ``bound``, dequantization
  ``uniform`` or ``variational``): per-image values: ``bpd`` (repeats, images), ``nll_nats`` (the
  continuous negative log-likelihood in model space), ``log_q`` (nats), ``nfe`` (repeats,
  batches), ``indices`` (the images' positions in the split);
- ``report.json``: one entry per snapshot, method and dequantisation (key
  ``<k>_<method>_<dequantization>``) with ``bpd``, ``bpd_stderr``, ``method``,
  ``dequantization``, ``num_images``, ``num_repeats``, ``nfe_mean``, ``checkpoint``, ``step``,
  ``seconds``, ``dataset``, ``data_source``, the SHA-256 of the snapshot file (and of the
  dequantiser's) and the settings used;
- ``bpd_curve.png``: bits/dim against training step over the evaluated snapshots;
- ``config.json``: the config of the latest evaluation run in this folder;
- ``progress_ckpt_<k>_<method>_<dequantization>[_rank<r>].pt``: partial results, written
  atomically after every batch, from which a killed evaluation continues. They are used only
  when the settings and the checkpoint files (by their SHA-256) are the ones they were computed
  with; a snapshot or dequantiser trained anew starts the evaluation afresh.

Reproducibility: all randomness of image i in repeat r (dequantisation noise, Hutchinson probe,
bound's times and noise) comes from generators seeded by (config.seed, r, i), and batches are
fixed blocks of the split (batch b holds images b * batch_size ...). A resumed evaluation
therefore gives exactly the numbers of an uninterrupted one, and ranks of a distributed run take
whole batches, so that N ranks give the same per-image numbers as one. (Under the ODE the batch
still matters at the level of the solver tolerance: the adaptive step size is chosen for the
whole batch.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from torch import Tensor, nn

from scoreflow import checkpoints, distributed, factory, records
from scoreflow.bound import negative_elbo
from scoreflow.data import dataset_images
from scoreflow.dequantization import UniformDequantizer, VariationalDequantizer
from scoreflow.likelihood import (
    bits_per_dim,
    bpd_offset,
    ode_likelihood,
)
from scoreflow.score import get_score_fn
from scoreflow.sde import SDE, VESDE

log = logging.getLogger(__name__)

__all__ = ["evaluate", "image_generators", "load_dequantizer", "bpd_batch"]

_DEQUANTIZATION_STREAM = 0
_ESTIMATOR_STREAM = 1


def image_generators(
    seed: int, repeat: int, indices: list[int], stream: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, repeat, image index, stream) only."""
    generators = []
    for index in indices:
        state = np.random.SeedSequence([seed, repeat, index, stream]).generate_state(2)
        value = int(state[0]) << 32 | int(state[1])
        generators.append(torch.Generator(device=device).manual_seed(value & (2**63 - 1)))
    return generators


def load_dequantizer(
    config: ml_collections.ConfigDict, folder: Path, device: torch.device
) -> tuple[nn.Module, Path]:
    """The Flow++ dequantiser with its EMA weights from ``folder`` (a ``checkpoints`` folder).

    ``config.deq.ckpt_id`` >= 0 picks ``checkpoint_<ckpt_id>.pth``; -1 the newest readable one.
    """
    if config.deq.ckpt_id >= 0:
        path = folder / f"checkpoint_{config.deq.ckpt_id}.pth"
        state = checkpoints.load_checkpoint(path)
    else:
        found = checkpoints.load_latest(folder)
        if found is None:
            raise FileNotFoundError(
                f"no dequantiser checkpoint in {folder}: train one with --mode train_deq or set "
                "--config.eval.dequantizer=False"
            )
        state, path = found
    flow = factory.get_dequantizer(config).to(device)
    checkpoints.restore_ema_weights(flow, state)
    flow.eval()
    return flow, path


def bpd_batch(
    score_fn,
    sde: SDE,
    images: Tensor,
    indices: list[int],
    repeat: int,
    dequantizer,
    scaler,
    settings: dict[str, Any],
) -> tuple[Tensor, Tensor, int]:
    """(nll (B,) nats in model space, log_q (B,) nats, nfe) for uint8 ``images`` (B, C, H, W).

    A pure function of the images, their indices in the split and the repeat number.
    """
    device = images.device
    seed = settings["seed"]
    deq_generators = image_generators(seed, repeat, indices, _DEQUANTIZATION_STREAM, device)
    estimator_generators = image_generators(seed, repeat, indices, _ESTIMATOR_STREAM, device)
    with torch.no_grad():
        y, log_q = dequantizer.dequantize(images, deq_generators)
    x = scaler(y)

    if settings["method"] == "bound":
        with torch.no_grad():
            nll = negative_elbo(
                score_fn,
                sde,
                x,
                settings["eps"],
                settings["bound_num_times"],
                importance_weighting=not isinstance(sde, VESDE),
                offset=settings["offset"],
                generator=estimator_generators,
            )
        return nll, log_q, settings["bound_num_times"] + int(settings["offset"])

    result = ode_likelihood(
        score_fn,
        sde,
        x,
        eps=settings["eps"],
        rtol=settings["rtol"],
        atol=settings["atol"],
        divergence=settings["divergence"],
        generator=estimator_generators,
        time_variable=settings["time_variable"],
        error_norm=settings["error_norm"],
    )
    return -result.logp, log_q, result.nfe


class _Progress:
    """Per-image results of one (snapshot, method) run, saved atomically after every batch."""

    def __init__(self, path: Path, fingerprint: dict, num_repeats: int, num_images: int, batches):
        self.path = path
        self.fingerprint = fingerprint
        self.nll = torch.full((num_repeats, num_images), math.nan, dtype=torch.float64)
        self.log_q = torch.full((num_repeats, num_images), math.nan, dtype=torch.float64)
        self.nfe = torch.full((num_repeats, batches), -1, dtype=torch.long)
        self.seconds = 0.0
        if path.is_file():
            state = checkpoints.load_checkpoint(path)
            if state.get("fingerprint") == json.dumps(fingerprint, sort_keys=True):
                self.nll, self.log_q, self.nfe = state["nll"], state["log_q"], state["nfe"]
                self.seconds = float(state["seconds"])
                log.info("resuming from %s (%d batches done)", path, self.num_done())
            else:
                log.warning("%s was written with other settings; starting afresh", path.name)

    def num_done(self) -> int:
        return int((self.nfe >= 0).sum())

    def save(self) -> None:
        state = {
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "nll": self.nll,
            "log_q": self.log_q,
            "nfe": self.nfe,
            "seconds": self.seconds,
        }
        checkpoints.save_atomic(state, self.path)


def _bpd_snapshot(
    config: ml_collections.ConfigDict,
    sde: SDE,
    model: nn.Module,
    images: Tensor,
    dequantizer,
    settings: dict[str, Any],
    eval_dir: Path,
    run_name: str,
    fingerprint: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Bits/dim of every image for one snapshot: (report entry, per-image arrays).

    ``run_name`` (``<k>_<method>_<dequantization>``) names the progress file; ``fingerprint``
    (the settings and the checkpoint files' digests) decides whether that file can be resumed.
    """
    device = next(model.parameters()).device
    num_images, num_repeats = images.shape[0], settings["num_repeats"]
    batch_size = settings["batch_size"]
    num_batches = math.ceil(num_images / batch_size)
    dim = int(np.prod(images.shape[1:]))
    scaler, _ = factory.data_scaler(config)
    offset_bits = bpd_offset(0.5 if config.data.centered else 1.0)
    score_fn = get_score_fn(sde, model)

    # this rank's whole batches
    my_batches = distributed.shard_indices(num_batches)
    suffix = f"_rank{distributed.rank()}" if distributed.world_size() > 1 else ""
    name = f"progress_ckpt_{run_name}{suffix}.pt"
    progress = _Progress(eval_dir / name, fingerprint, num_repeats, num_images, num_batches)
    my_images = min(my_batches.stop * batch_size, num_images) - my_batches.start * batch_size
    done_images = sum(
        min((b + 1) * batch_size, num_images) - b * batch_size
        for r in range(num_repeats)
        for b in my_batches
        if progress.nfe[r, b] >= 0
    )
    bar = records.progress(
        total=num_repeats * max(my_images, 0),
        initial=done_images,
        desc=f"bpd ckpt {run_name}",
        unit="image",
    )

    for repeat in range(num_repeats):
        for b in my_batches:
            if progress.nfe[repeat, b] >= 0:
                continue
            start = time.time()
            lo, hi = b * batch_size, min((b + 1) * batch_size, num_images)
            batch = images[lo:hi].to(device)
            nll, log_q, nfe = bpd_batch(
                score_fn, sde, batch, list(range(lo, hi)), repeat, dequantizer, scaler, settings
            )
            progress.nll[repeat, lo:hi] = nll.double().cpu()
            progress.log_q[repeat, lo:hi] = log_q.double().cpu()
            progress.nfe[repeat, b] = nfe
            progress.seconds += time.time() - start
            progress.save()

            done = ~progress.nll.isnan()
            running = bits_per_dim((progress.nll + progress.log_q)[done].mean(), dim, offset_bits)
            bar.update(hi - lo)
            bar.set_postfix(bpd=f"{float(running):.4f}", nfe=nfe)
    bar.close()

    # gather this rank's images (contiguous, in rank order) from every rank
    first = my_batches.start * batch_size if len(my_batches) else 0
    last = min(my_batches.stop * batch_size, num_images) if len(my_batches) else 0
    nll = distributed.all_gather_cat(progress.nll[:, first:last].T.contiguous().to(device)).T
    log_q = distributed.all_gather_cat(progress.log_q[:, first:last].T.contiguous().to(device)).T
    nfe = distributed.all_gather_cat(
        progress.nfe[:, my_batches.start : my_batches.stop].T.contiguous().to(device)
    ).T
    seconds = distributed.all_gather_cat(torch.tensor([progress.seconds], device=device))
    nll, log_q, nfe = nll.cpu().numpy(), log_q.cpu().numpy(), nfe.cpu().numpy()

    # per-image bits/dim, averaged over repeats; the standard error is that of the mean of the
    # per-image means (it contains the spread over images and the estimator's noise)
    bpd = bits_per_dim(torch.from_numpy(nll + log_q), dim, offset_bits).numpy()
    per_image = bpd.mean(axis=0)
    stderr = float(per_image.std(ddof=1) / math.sqrt(num_images)) if num_images > 1 else 0.0
    entry = {
        "bpd": float(per_image.mean()),
        "bpd_stderr": float(stderr),
        "nll_nats_mean": float(nll.mean()),
        "log_q_bpd": float(log_q.mean() / (dim * math.log(2))),
        "nfe_mean": float(nfe.mean()),
        "num_images": int(num_images),
        "num_repeats": int(num_repeats),
        "seconds": float(seconds.max()),
        "offset_bits": offset_bits,
        "settings": settings,
    }
    arrays = {
        "bpd": bpd,
        "nll_nats": nll,
        "log_q": log_q,
        "nfe": nfe,
        "indices": np.arange(num_images),
    }
    return entry, arrays


def _snapshot_paths(config: ml_collections.ConfigDict, workdir: Path) -> list[tuple[int, Path]]:
    folder = workdir / "checkpoints"
    wanted = range(config.eval.begin_ckpt, config.eval.end_ckpt + 1)
    found = [(k, folder / f"checkpoint_{k}.pth") for k in wanted]
    present = [(k, p) for k, p in found if p.is_file()]
    for _, path in found:
        if not path.is_file():
            log.warning("snapshot %s does not exist; skipped", path)
    if not present:
        available = [k for k, _ in checkpoints.list_checkpoints(folder)]
        raise FileNotFoundError(
            f"no snapshot checkpoint_<k>.pth with {wanted.start} <= k <= {wanted.stop - 1} in "
            f"{folder} (available: {available}); set --config.eval.begin_ckpt/end_ckpt"
        )
    return present


# settings that change what a trained score model means; model.dropout and model.ema_rate act
# only during training
_MODEL_DEFINING = ("training.sde", "data.centered", "data.image_size", "data.num_channels")
_TRAINING_ONLY = ("model.dropout", "model.ema_rate")


def training_config_differences(
    config: ml_collections.ConfigDict, training_config: dict[str, Any]
) -> list[str]:
    """The fields that define the score model (``model.*`` but its training-only fields,
    ``training.sde``, ``data.centered``, ``data.image_size``, ``data.num_channels``) on which
    ``config`` differs from ``training_config`` (the run's config.json), each as
    "field (value here, value in training)"."""
    ours = json.loads(config.to_json())
    fields = list(_MODEL_DEFINING) + [
        f"model.{key}" for key in sorted(ours.get("model", {}))
        if f"model.{key}" not in _TRAINING_ONLY
    ]  # fmt: skip
    found = []
    for field in fields:
        section, key = field.split(".")
        mine = ours.get(section, {}).get(key)
        theirs = training_config.get(section, {}).get(key, mine)
        if mine != theirs:
            found.append(f"{field} ({mine!r} here, {theirs!r} in training)")
    return found


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    eval_folder: str = "eval",
    deq_folder: str = "flowpp_dequantizer",
) -> dict[str, Any]:
    """Evaluate the snapshots of ``workdir``; write and return the report (see module docstring).

    ``deq_folder`` is the dequantiser's working directory under ``workdir`` (used when
    ``eval.dequantizer``); its snapshots are read from ``<workdir>/<deq_folder>/checkpoints``.
    """
    workdir = Path(workdir)
    eval_dir = workdir / eval_folder
    eval_dir.mkdir(parents=True, exist_ok=True)
    distributed.init(config.device)  # first, so that only rank 0 writes the log file
    records.setup_logging(eval_dir / "evaluation_log.txt")
    factory.check_config(config)
    evaluation = config.eval
    if not (evaluation.enable_bpd or evaluation.enable_sampling):
        raise factory.ConfigError(
            "--mode eval has nothing to do: set --config.eval.enable_bpd=True (bits/dim) or "
            "--config.eval.enable_sampling=True (samples and their metrics)"
        )
    if evaluation.enable_sampling:
        from scoreflow.evaluate_sampling import check_stats_file

        check_stats_file(config)  # before the bits/dim pass, not after it
    records.save_json(json.loads(config.to_json()), eval_dir / "config.json")
    device = distributed.default_device(config.device)

    trained_with = workdir / "config.json"
    if trained_with.is_file() and distributed.is_main():
        differences = training_config_differences(config, json.loads(trained_with.read_text()))
        if differences:
            log.warning(
                "the config differs from the one the run was trained with (%s) in %s: the "
                "figures are those of another model; evaluate with the training config",
                trained_with,
                ", ".join(differences),
            )
    sde = factory.get_sde(config)
    model = factory.get_model(config).to(device)
    # frozen: the likelihood's vector-Jacobian products in x then keep no activations that only
    # weight gradients would need (9-13% less time per function evaluation on a CPU)
    model.eval().requires_grad_(False)
    log.info(
        "score model %s with %d parameters on %s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
        device,
    )

    # the images and the dequantiser
    images, dequantizer, settings, deq_identity = None, None, {}, {}
    if evaluation.enable_bpd:
        train_set, test_set = factory.get_datasets(config)
        dataset = test_set if evaluation.bpd_dataset == "test" else train_set
        images = dataset_images(dataset)
        if evaluation.max_images > 0:
            images = images[: evaluation.max_images]
        data_source = getattr(dataset, "source", config.data.dataset)
        log.info(
            "bits/dim on %d %s images of %s", images.shape[0], evaluation.bpd_dataset, data_source
        )
        if evaluation.dequantizer:
            flow, deq_path = load_dequantizer(config, workdir / deq_folder / "checkpoints", device)
            log.info("variational dequantiser from %s", deq_path)
            deq_identity = {
                "dequantizer_checkpoint": str(deq_path),
                "dequantizer_sha256": checkpoints.file_digest(deq_path),
            }
            dequantizer = VariationalDequantizer(flow)
            dequantization = "variational"
        else:
            dequantizer = UniformDequantizer()
            dequantization = "uniform"
        method = "bound" if evaluation.bound else "ode"
        settings = {
            "method": method,
            "dequantization": dequantization,
            "dataset": f"{config.data.dataset}:{evaluation.bpd_dataset}",
            "data_source": str(data_source),
            "eps": float(config.training.smallest_time),
            "rtol": float(evaluation.rtol),
            "atol": float(evaluation.atol),
            "divergence": evaluation.divergence,
            "time_variable": evaluation.time_variable,
            "error_norm": evaluation.error_norm,
            "bound_num_times": int(evaluation.bound_num_times),
            "offset": bool(evaluation.offset),
            "seed": int(config.seed),
            "batch_size": int(evaluation.batch_size),
            "num_repeats": int(evaluation.num_repeats),
            "num_images": int(images.shape[0]),
        }

    # one report per evaluation folder, one entry per snapshot (kept across resumptions)
    report_path = eval_dir / "report.json"
    report: dict[str, Any] = {"checkpoints": {}}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("checkpoints", {})

    for ckpt, path in _snapshot_paths(config, workdir):
        state = checkpoints.load_checkpoint(path)
        try:
            checkpoints.restore_ema_weights(model, state, str(path))
        except checkpoints.CheckpointError as err:
            raise checkpoints.CheckpointError(
                f"{err}; evaluate with the config the run was trained with ({trained_with})"
            ) from err
        step = int(state.get("step", -1))
        log.info("snapshot %s (step %d)", path, step)
        entry: dict[str, Any] = {"checkpoint": ckpt, "checkpoint_path": str(path), "step": step}

        if evaluation.enable_bpd:
            run_name = f"{ckpt}_{settings['method']}_{settings['dequantization']}"
            identity = {"checkpoint_sha256": checkpoints.file_digest(path), **deq_identity}
            bpd_entry, arrays = _bpd_snapshot(
                config,
                sde,
                model,
                images,
                dequantizer,
                settings,
                eval_dir,
                run_name,
                {**settings, **identity},
            )
            entry.update(bpd_entry)
            entry.update(identity)
            entry.update({k: settings[k] for k in ("method", "dequantization", "dataset")})
            entry["data_source"] = settings["data_source"]
            if distributed.is_main():
                checkpoints.savez_atomic(eval_dir / f"bpd_ckpt_{run_name}.npz", **arrays)
            log.info(
                "snapshot %d: %.4f +- %.4f bits/dim (%s, %s dequantisation, %d images x %d, "
                "mean NFE %.1f)",
                ckpt,
                entry["bpd"],
                entry["bpd_stderr"],
                settings["method"],
                settings["dequantization"],
                entry["num_images"],
                entry["num_repeats"],
                entry["nfe_mean"],
            )

        if evaluation.enable_sampling:
            from scoreflow.evaluate_sampling import run_sampling_eval

            entry.update(run_sampling_eval(config, sde, model, str(eval_dir), ckpt))

        key = run_name if evaluation.enable_bpd else str(ckpt)
        report["checkpoints"][key] = entry
        records.save_json(report, report_path)
        distributed.barrier()

    if distributed.is_main():
        _draw_curve(report, eval_dir)
    log.info("report written to %s", report_path)
    return report


def _draw_curve(report: dict[str, Any], eval_dir: Path) -> None:
    """bits/dim against training step, one line per method, in ``bpd_curve.png``."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in report["checkpoints"].values():
        if "bpd" not in entry:
            continue
        name = f"{entry['method']} ({entry['dequantization']})"
        steps, values = series.setdefault(name, ([], []))
        steps.append(entry["step"])
        values.append(entry["bpd"])
    for name, (steps, values) in series.items():
        order = np.argsort(steps)
        series[name] = ([steps[i] for i in order], [values[i] for i in order])
    if series:
        records.save_curve(series, eval_dir / "bpd_curve.png", "training step", "bits/dim")
