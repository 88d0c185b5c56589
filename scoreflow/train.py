"""Training driver of the score model: ``train(config, workdir)``.

One optimisation step is: take this step's batch, dequantise / flip / scale it, compute the
denoising score matching loss (:mod:`scoreflow.losses`), clip the gradient at global norm
``optim.grad_clip``, take an Adam step at the warmed-up learning rate, update the EMA.

What lands in ``workdir``:

- ``config.json``: the config of the latest start (written once the checkpoint, if any, fits);
- ``stdout.txt``: the log (appended across restarts);
- ``tensorboard/``: scalars loss, eval_loss, lr, grad_norm, steps_per_sec (a resumed run hides
  the events logged after its checkpoint);
- ``curve.csv``: append-only rows ``step,loss,eval_loss``, and ``loss_curve.png`` drawn from it at
  every snapshot (rows repeated after a restart are resolved in favour of the latest);
- ``checkpoints/checkpoint_<k>.pth``: snapshot k = step // snapshot_freq (and at the last step);
- ``checkpoints-meta/checkpoint_<step>.pth``: pre-emption checkpoints, the newest two kept;
- ``samples/`` (if ``training.snapshot_sampling``): whatever the sampling snapshot writes.

Resumption is bit-exact on the CPU: a checkpoint holds the model, the EMA, the optimiser, the
step, the global torch RNG (dropout), the CUDA RNG, and the two dedicated generators of the loop
(``data``: flips and dequantisation noise; ``noise``: t and z of the loss). The order of the data
is a pure function of (seed, epoch) (:class:`scoreflow.data.EpochOrder`), so the position in the
data is the step itself. Evaluation and snapshot sampling run under their own random state and
leave the training's untouched. On GPUs cuDNN may pick non-deterministic kernels, so a resumed
run there is equal in distribution, not necessarily in every bit. A run resumed on another kind
of device (a GPU run on a CPU) cannot continue the saved generator streams, whose layout
depends on the device; they are reseeded from (seed, step) with a warning.

Under ``torchrun`` (docs/distributed.md) the network is wrapped in DistributedDataParallel and
rank r of N takes the contiguous block r of every global batch of ``training.batch_size``
(which N must divide). The ``data`` and ``noise`` generators are equal on every rank: each rank
draws the dequantisation noise, flips, t and z of the whole global batch and keeps its block, so
N ranks compute the same per-example losses as one process, and DDP's gradient average (a mean
of equal-size block means) is the one-process gradient. Weights, EMA and generators therefore
stay equal on all ranks; rank 0 alone writes files. A checkpoint also keeps every rank's global
RNG (dropout), so a run resumes on the same or another number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
import torch
from torch import Tensor, nn

from scoreflow import checkpoints, distributed, factory, losses, records
from scoreflow.data import EpochOrder, preprocess, rank_batches
from scoreflow.ema import EMA
from scoreflow.importance import ImportanceSampler
from scoreflow.optim import adam, learning_rate

log = logging.getLogger(__name__)

__all__ = ["TrainingDivergedError", "train"]

KEEP_PREEMPTION = 2
CURVE_FILE = "curve.csv"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def _global_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _random_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The generators (equal on every rank) and each rank's global RNGs (a collective call)."""
    ranks = distributed.all_gather_object(_global_rng_state())
    state: dict[str, Any] = {**ranks[0], "ranks": ranks}
    for name, gen in generators.items():
        state[name] = gen.get_state()
    return state


def _set_random_state(
    state: dict[str, Any], generators: dict[str, torch.Generator], seed: int, step: int
) -> None:
    """Restore the generators and this rank's global RNGs (dropout).

    Rank r takes the global RNGs rank r saved; a rank the interrupted run did not have (a resume
    on more ranks) seeds them from (seed, step, rank) instead. A generator whose saved state does
    not fit it (saved on another device type) is seeded from (seed, step, its number): not from
    the rank, since these generators must stay equal on every rank.
    """
    rank = distributed.rank()
    ranks = state.get("ranks", [{k: state[k] for k in ("torch", "cuda") if k in state}])
    if rank < len(ranks):
        mine = ranks[rank]
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            try:
                torch.cuda.set_rng_state_all(mine["cuda"])
            except (IndexError, RuntimeError) as err:  # another number or kind of GPUs
                log.warning("CUDA RNG state not restored (%s): reseeded", err)
                torch.cuda.manual_seed_all(distributed.rank_seed(seed, step, rank))
    else:
        torch.manual_seed(distributed.rank_seed(seed, step, rank))
    for number, (name, gen) in enumerate(generators.items(), start=1):
        fallback = distributed.rank_seed(seed, step, number)
        checkpoints.load_generator_state(gen, state[name], fallback, name)


@contextlib.contextmanager
def _side_branch(device: torch.device):
    """Run code whose random draws must not change the training's (global RNGs restored)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _append_curve(workdir: Path, step: int, loss: float | None, eval_loss: float | None) -> None:
    if not distributed.is_main():
        return
    path = workdir / CURVE_FILE
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss", "eval_loss"])
        writer.writerow(
            [step] + ["" if value is None else f"{value:.6g}" for value in (loss, eval_loss)]
        )


def _draw_curve(workdir: Path) -> None:
    """loss_curve.png from curve.csv; for a step logged twice (after a restart) the last wins."""
    path = workdir / CURVE_FILE
    if not distributed.is_main() or not path.exists():
        return
    series: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for name in series:
                if row.get(name):
                    series[name][int(row["step"])] = float(row[name])
    curves = {
        name: (sorted(values), [values[s] for s in sorted(values)])
        for name, values in series.items()
        if values
    }
    if curves:
        records.save_curve(curves, workdir / "loss_curve.png", "step", "DSM loss")


def _check_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _snapshot_sampling(config, sde, model: nn.Module, ema: EMA, step: int, workdir: Path):
    """Samples from the EMA weights at a snapshot (written by the sampling module)."""
    from scoreflow.evaluate_sampling import snapshot_samples  # loads the metrics when used

    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model)
    ema_model.eval()
    snapshot_samples(config, sde, ema_model, step, str(workdir))


def _device_options(config, model: nn.Module, device: torch.device):
    """Apply training.channels_last, DDP (under a process group), training.compile, training.amp.

    Returns (model to call in training, autocast context factory). ``model`` itself stays the
    unwrapped network (its parameters are shared with the returned one). Every option acts on
    any device; whether it pays depends on the device and the network (docs/training.md).
    """
    training = config.training
    if training.channels_last:
        log.info(
            "training.channels_last: the network and its inputs in channels_last on %s", device
        )
        model = model.to(memory_format=torch.channels_last)
    call_model: nn.Module = distributed.wrap_ddp(model, device)
    if training.compile:
        log.info("training.compile: torch.compile of the network (the first steps compile it)")
        call_model = torch.compile(call_model)  # type: ignore[assignment]
    if training.amp:
        log.info("training.amp: bf16 autocast of the network on %s", device)
        if device.type == "cpu" and not distributed.cpu_has_bf16():
            log.warning(
                "this CPU has no bf16 instructions: training.amp will be slower than float32"
            )

    def autocast():
        if training.amp:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return call_model, autocast


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Train the score model of ``config`` in ``workdir``, resuming from its newest checkpoint.

    Raises :class:`scoreflow.factory.ConfigError` for impossible settings,
    :class:`scoreflow.checkpoints.CheckpointError` when the checkpoint to resume from does not
    fit the model of ``config``, and :class:`TrainingDivergedError` when the loss stops being
    finite.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.init(config.device)  # first, so that only rank 0 writes the log file
    records.setup_logging(workdir / "stdout.txt")
    factory.check_config(config)
    world = distributed.world_size()
    if config.training.batch_size % world:
        raise factory.ConfigError(
            f"training.batch_size {config.training.batch_size} is not divisible by the "
            f"{world} processes: each rank takes an equal share of the global batch"
        )
    frequencies = ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption")
    for name in ("n_iters",) + frequencies:
        if config.training[name] < 1:
            raise factory.ConfigError(f"training.{name} must be at least 1")
    device = distributed.default_device(config.device)
    training, optim = config.training, config.optim
    seed = config.seed

    # the experiment's objects
    sde = factory.get_sde(config)
    weighting = losses.weighting_name(training.likelihood_weighting, training.importance_weighting)
    eps = training.smallest_time
    sampler = ImportanceSampler(sde, eps) if weighting == "importance" else None
    torch.manual_seed(seed)
    model = factory.get_model(config).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("score model: %s with %d parameters on %s", type(model).__name__, num_params, device)
    log.info("SDE %s, weighting %s, eps %g", training.sde, weighting, eps)
    if sampler is not None:
        log.info("importance sampling of t: normaliser Z = %.4f", sampler.normalizer)
    if distributed.rank() > 0:
        # every rank starts from the same weights; dropout masks differ between ranks
        torch.manual_seed(distributed.rank_seed(seed, 0, distributed.rank()))
    if world > 1:
        log.info("DistributedDataParallel over %d processes, %d images each", world,
                 training.batch_size // world)  # fmt: skip
    ema = EMA(model, config.model.ema_rate)
    optimizer = adam(
        model.parameters(), optim.lr, optim.beta1, eps=optim.eps, weight_decay=optim.weight_decay
    )
    if optim.optimizer != "Adam":
        raise factory.ConfigError(f"optimizer {optim.optimizer!r} is not supported; use Adam")
    # equal on every rank: each draws the noise of the whole global batch and keeps its block
    generators = {
        "data": torch.Generator(device=device).manual_seed(seed + 1),
        "noise": torch.Generator(device=device).manual_seed(seed + 2),
    }

    # the data
    train_set, test_set = factory.get_datasets(config)
    log.info(
        "data %s: %d training and %d test images of shape %s",
        config.data.dataset,
        len(train_set),
        len(test_set),
        tuple(train_set[0].shape),
    )
    if len(train_set) < training.batch_size:
        raise factory.ConfigError(
            f"the data set has {len(train_set)} training images, fewer than one batch of "
            f"{training.batch_size}: lower --config.training.batch_size"
        )
    if len(test_set) == 0:
        raise factory.ConfigError(
            "the test split is empty, and training evaluates its loss on held-out images: "
            "raise --config.data.test_fraction"
        )
    scaler, _ = factory.data_scaler(config)
    order = EpochOrder(len(train_set), training.batch_size, seed, stream=0)
    eval_batch_size = min(training.batch_size, len(test_set))
    eval_order = EpochOrder(len(test_set), eval_batch_size, seed, stream=1)

    # resume from the newest readable pre-emption checkpoint
    snapshot_dir, meta_dir = workdir / "checkpoints", workdir / "checkpoints-meta"
    if distributed.is_main():
        for folder in (meta_dir, snapshot_dir):
            for stale in checkpoints.remove_stale_temporaries(folder):
                log.info("removed %s, left by a run killed while writing it", stale)
    step = 0
    found = checkpoints.load_latest(meta_dir, map_location="cpu")
    if found is not None:
        state, path = found
        hint = (
            f"to resume the run in {workdir}, use the config it was started with "
            f"({workdir / 'config.json'}), or train in a new --workdir"
        )
        checkpoints.load_training_state(state, path, model, ema, optimizer, hint)
        _set_random_state(state["random"], generators, seed, int(state["step"]))
        step = int(state["step"])
        if state.get("batch_size") != training.batch_size:
            log.warning(
                "resuming with batch size %d after %s: the data order differs from the "
                "interrupted run's",
                training.batch_size,
                state.get("batch_size"),
            )
        log.info("resumed from %s at step %d", path, step)
    else:
        log.info("starting from scratch (no checkpoint in %s)", meta_dir)
    records.save_json(json.loads(config.to_json()), workdir / "config.json")
    log.info("snapshots go to %s, pre-emption checkpoints to %s", snapshot_dir, meta_dir)
    if step >= training.n_iters:
        log.info("training already finished: step %d of %d", step, training.n_iters)
        return

    call_model, autocast = _device_options(config, model, device)
    channels_last = training.channels_last
    # this rank's rows of the global batch (all of it on one process)
    shard = distributed.shard_indices(training.batch_size)
    block = (shard.start, training.batch_size)

    def to_model_space(batch: Tensor) -> Tensor:
        x = preprocess(
            batch.to(device, non_blocking=True),
            scaler,
            generators["data"],
            dequantize=config.data.uniform_dequantization,
            flip=config.data.random_flip,
            block=block,
        )
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def loss_of(
        x: Tensor, generator: torch.Generator, net: nn.Module, in_block: bool = False
    ) -> Tensor:
        """Batch-mean DSM loss of ``x``; ``in_block``: x is this rank's block of the global
        batch, whose t and z are drawn whole (in dsm_loss's order) and this block's kept."""
        t = z = None
        if in_block:
            start, total = block
            rows = slice(start, start + x.shape[0])
            t = losses.sample_times(
                sde, total, weighting, eps, generator, x.device, x.dtype, sampler
            )[rows]
            z = torch.randn((total,) + x.shape[1:], generator=generator, device=x.device,
                            dtype=x.dtype)[rows]  # fmt: skip
        with autocast():
            loss, _ = losses.dsm_loss(
                sde, net, x, weighting, eps, training.reduce_mean, generator, sampler, t, z
            )
        return loss.float()

    def save(folder: Path, number: int, random_state: dict[str, Any]) -> Path:
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "random": random_state,
            "batch_size": training.batch_size,
            "data_position": list(order.position(step)),
            "seed": seed,
            "config": config.to_json(),
        }
        return checkpoints.save_atomic(state, folder / f"checkpoint_{number}.pth")

    def evaluate_loss() -> float:
        """Loss of the EMA weights on one held-out batch, without gradient or training RNG."""
        with _side_branch(device), torch.no_grad():
            backup = [p.detach().clone() for p in model.parameters()]
            ema.copy_to(model)
            model.eval()
            index = step // training.eval_freq
            batch = torch.stack([test_set[int(i)] for i in eval_order.batch_indices(index)])
            gen = torch.Generator(device=device).manual_seed(seed + 10_000 + index)
            x = preprocess(batch.to(device), scaler, gen, config.data.uniform_dequantization)
            loss = float(loss_of(x, gen, model))  # every rank alike, without DDP
            for p, b in zip(model.parameters(), backup, strict=True):
                p.copy_(b)
            model.train()
        return loss

    # the loop
    writer = records.ScalarWriter(workdir / "tensorboard", purge_step=step + 1 if step else None)
    batches = rank_batches(
        train_set, order, step, training.num_workers, pin_memory=device.type == "cuda"
    )
    model.train()
    bar = records.progress(total=training.n_iters, initial=step, desc="train", unit="step")
    last_time, last_step = time.perf_counter(), step
    try:
        while step < training.n_iters:
            x = to_model_space(next(batches))

            # one optimisation step
            lr = learning_rate(step + 1, optim.lr, optim.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_of(x, generators["noise"], call_model, in_block=True)
            # the global batch's loss (the mean of the ranks' equal-size block means), so that
            # every rank takes the same decision below
            global_loss = distributed.mean_over_ranks(loss.detach())
            if not torch.isfinite(global_loss):
                raise TrainingDivergedError(
                    f"the training loss became {float(global_loss)} at step {step + 1}; the last "
                    f"good checkpoint in {meta_dir} is untouched (lower optim.lr or check the data)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
            bar.update(1)

            # logging
            if step % training.log_freq == 0 or step == training.n_iters:
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                loss_value, norm = float(global_loss), float(grad_norm)
                log.info(
                    "step %d: loss %.5g, lr %.3g, grad norm %.3g, %.2f steps/s",
                    step, loss_value, lr, norm, rate,
                )  # fmt: skip
                for tag, value in (
                    ("loss", loss_value),
                    ("lr", lr),
                    ("grad_norm", norm),
                    ("steps_per_sec", rate),
                ):
                    writer.add(tag, value, step)
                _append_curve(workdir, step, loss_value, None)
                bar.set_postfix(loss=f"{loss_value:.4g}", rate=f"{rate:.2f}/s")
            if step % training.eval_freq == 0:
                eval_loss = evaluate_loss()
                log.info("step %d: eval loss %.5g", step, eval_loss)
                writer.add("eval_loss", eval_loss, step)
                _append_curve(workdir, step, None, eval_loss)

            # checkpoints
            last = step == training.n_iters
            preempt = step % training.snapshot_freq_for_preemption == 0 or last
            snapshot = step % training.snapshot_freq == 0 or last
            if (preempt or snapshot) and not _check_finite(model):
                raise TrainingDivergedError(
                    f"the weights are no longer finite at step {step}; not writing a checkpoint "
                    f"(the last good one in {meta_dir} is untouched)"
                )
            # every rank gathers the RNG states (a collective); only rank 0 writes
            random_state = _random_state(generators) if preempt or snapshot else {}
            if preempt and distributed.is_main():
                path = save(meta_dir, step, random_state)
                checkpoints.prune(meta_dir, KEEP_PREEMPTION)
                log.debug("pre-emption checkpoint %s", path)
            if snapshot and distributed.is_main():
                path = save(snapshot_dir, step // training.snapshot_freq, random_state)
                log.info("step %d: snapshot %s", step, path)
                writer.flush()
                _draw_curve(workdir)
                if training.snapshot_sampling:
                    with _side_branch(device):
                        _snapshot_sampling(config, sde, model, ema, step, workdir)
    finally:
        bar.close()
        writer.close()
    log.info("training finished at step %d", step)
