"""Training driver of the variational dequantiser: ``train_deq(config, workdir, deq_folder)``.

The score model of ``workdir`` is loaded with its EMA weights from snapshot ``eval.ckpt_id``
(``<workdir>/checkpoints/checkpoint_<ckpt_id>.pth``) and frozen. A Flow++ dequantiser q(u | x)
(:mod:`scoreflow.nets.flowpp`) is then trained to minimise the variational bound on the negative
log-probability of 8-bit images x,

    L(x) = E_{u ~ q(.|x)}[ NELBO(y) + log q(u | x) ],   y = scaler((x + u) / 256),

where NELBO(y) is the score model's variational bound on -log p(y) in model space
(:func:`scoreflow.bound.negative_elbo`, one importance-sampled time per image, with the [0, eps]
offset when ``deq.offset``). Gradients reach q through u (reparameterised: u = f(noise; x)) and
through log q; the score model's weights get none.

Bits per dimension of the 8-bit image follow from the change of variables y -> x + u = 256 y:
-log P(x) <= E_q[-log p_y(y) + log q] + D log 256 in nats on [0, 256)^D, and from model space
(x_model = scaler(y), inverse scaler of slope a: 1/2 for data centred to [-1, 1]) p_y(y) =
p_model(x_model) / a^D, so

    bpd = (NELBO + log q) / (D ln 2) + 8 + log2 a,

that is 7 bits for centred data and 8 for data in [0, 1]
(:func:`scoreflow.likelihood.bpd_offset`).

One step: this step's batch (a pure function of seed and step, in the order of the score model's
training: :class:`scoreflow.data.EpochOrder`), an optional horizontal flip,
u ~ q(. | x/255), the loss above averaged over the batch, a gradient clipped at ``deq.grad_clip``,
Adam at the learning rate warmed up linearly over ``deq.warmup`` steps, an EMA update at
``deq.ema_rate``. Before the first step the dequantiser's actnorm and convolutions are
initialised from the first batch (data-dependent initialisation); that state is part of every
checkpoint, so a resumed run does not redo it.

What lands in ``<workdir>/<deq_folder>``:

- ``config.json``: the config of the latest start (the score model's stays in ``workdir``);
- ``stdout.txt``: the log (appended across restarts);
- ``tensorboard/``: train_bpd, eval_bpd (EMA weights, held-out batch), lr, grad_norm (a resumed
  run hides the events logged after its checkpoint);
- ``checkpoints/checkpoint_<k>.pth``: snapshot k = step // deq.snapshot_freq (and the last step),
  dicts with "model", "ema", "optimizer", "step" like the score model's training states;
- ``checkpoints-meta/checkpoint_<step>.pth``: pre-emption checkpoints (newest two kept), from
  which a restarted run resumes with every random state, bit-exactly on the CPU (on another
  kind of device the generators are reseeded from (seed, step, rank), with a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
import torch
from torch import Tensor, nn

from scoreflow import bound, checkpoints, data, distributed, factory, records
from scoreflow.ema import EMA
from scoreflow.likelihood import bits_per_dim, bpd_offset
from scoreflow.optim import adam, learning_rate
from scoreflow.score import get_score_fn
from scoreflow.sde import SDE, VESDE

log = logging.getLogger(__name__)

__all__ = ["train_deq", "load_frozen_score_model", "dequantization_loss", "offset_bits"]

KEEP_PREEMPTION = 2
NUM_LEVELS = 256
EVAL_NUM_TIMES = 8  # time samples per image of the held-out bits/dim (training uses one)


def load_frozen_score_model(
    config: ml_collections.ConfigDict, workdir: Path, device: torch.device
) -> nn.Module:
    """The score network of ``config`` with the EMA weights of snapshot ``eval.ckpt_id``, in
    eval mode with ``requires_grad`` off. Raises FileNotFoundError if the snapshot is missing."""
    path = workdir / "checkpoints" / f"checkpoint_{config.eval.ckpt_id}.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"score model snapshot {path} not found: run --mode train first (or set "
            f"--config.eval.ckpt_id to an existing snapshot)"
        )
    score_model = factory.get_model(config)
    checkpoints.restore_ema_weights(score_model, checkpoints.load_checkpoint(path))
    score_model.to(device).eval()
    score_model.requires_grad_(False)
    log.info("frozen score model: EMA weights of %s", path)
    return score_model


def offset_bits(inverse_scaler) -> float:
    """8 + log2(slope of the inverse scaler): 7 for data centred to [-1, 1], 8 for [0, 1]."""
    slope = float(inverse_scaler(torch.tensor(1.0)) - inverse_scaler(torch.tensor(0.0)))
    return bpd_offset(slope)


def dequantization_loss(
    dequantizer: nn.Module,
    score_fn,
    sde: SDE,
    x_uint8: Tensor,
    scaler,
    eps: float,
    offset: bool,
    generator: torch.Generator | None,
    num_times: int = 1,
) -> tuple[Tensor, Tensor]:
    """(NELBO(y) + log q(u | x) in nats, log_q), both (batch,), for uint8 images (batch, C, H, W).

    u = dequantizer(x / 255, noise) with noise ~ N(0, I), y = scaler((x + u) / 256). The bound
    uses ``num_times`` time samples per image, importance-sampled except under the VE SDE.
    """
    x = x_uint8.to(torch.float32)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    u, log_q = dequantizer(x / (NUM_LEVELS - 1), noise)
    y_model = scaler((x + u) / NUM_LEVELS)
    nelbo = bound.negative_elbo(
        score_fn, sde, y_model, eps, num_times=num_times,
        importance_weighting=not isinstance(sde, VESDE), offset=offset, generator=generator,
    )  # fmt: skip
    return nelbo + log_q, log_q


def _random_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Rank 0's random state, plus every rank's under "ranks" (a collective call)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state.update({name: gen.get_state() for name, gen in generators.items()})
    ranks = distributed.all_gather_object(state)
    return {**ranks[0], "ranks": ranks}


def _set_random_state(
    state: dict[str, Any], generators: dict[str, torch.Generator], seed: int, step: int
) -> None:
    """This rank's saved random state; a rank the saved run did not have seeds from
    (seed, step, rank)."""
    ranks = state.get("ranks", [state])
    rank = distributed.rank()
    if rank >= len(ranks):
        torch.manual_seed(distributed.rank_seed(seed, step, rank))
        for i, gen in enumerate(generators.values()):
            gen.manual_seed(distributed.rank_seed(seed, step, rank, i + 1))
        return
    state = ranks[rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for i, (name, gen) in enumerate(generators.items()):
        fallback = distributed.rank_seed(seed, step, rank, i + 1)
        checkpoints.load_generator_state(gen, state[name], fallback, name)


@contextlib.contextmanager
def _side_branch(device: torch.device):
    """Code whose random draws must not change the training's (global RNGs restored after)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def train_deq(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    deq_folder: str = "flowpp_dequantizer",
) -> None:
    """Train the Flow++ dequantiser of ``config.deq`` against the frozen score model of
    ``workdir``, in ``<workdir>/<deq_folder>``, resuming from its newest pre-emption checkpoint.

    Raises FileNotFoundError when the score model's snapshot ``eval.ckpt_id`` is missing,
    :class:`scoreflow.checkpoints.CheckpointError` when the checkpoint to resume from does not
    fit the dequantiser of ``config``, and RuntimeError when the loss stops being finite.
    """
    workdir = Path(workdir)
    deq_dir = workdir / deq_folder
    deq_dir.mkdir(parents=True, exist_ok=True)
    distributed.init(config.device)  # first, so that only rank 0 writes the log file
    records.setup_logging(deq_dir / "stdout.txt")
    factory.check_config(config)
    if config.deq.batch_size % distributed.world_size():
        raise factory.ConfigError(
            f"deq.batch_size {config.deq.batch_size} is not divisible by the "
            f"{distributed.world_size()} processes: each rank takes an equal share of the batch"
        )
    device = distributed.default_device(config.device)
    deq, seed = config.deq, config.seed

    # the frozen score model and the dequantiser
    sde = factory.get_sde(config)
    score_fn = get_score_fn(sde, load_frozen_score_model(config, workdir, device))
    eps = config.training.smallest_time
    torch.manual_seed(seed)
    dequantizer = factory.get_dequantizer(config).to(device)
    num_params = sum(p.numel() for p in dequantizer.parameters())
    log.info("dequantiser: Flow++ %s with %d parameters on %s", deq.arch, num_params, device)
    generators = {
        "noise": torch.Generator(device=device).manual_seed(seed + 11 + distributed.rank()),
        "flip": torch.Generator(device=device).manual_seed(seed + 12 + distributed.rank()),
    }

    # the data
    train_set, test_set = factory.get_datasets(config)
    log.info(
        "data %s: %d training and %d test images",
        config.data.dataset,
        len(train_set),
        len(test_set),
    )
    scaler, inverse_scaler = factory.data_scaler(config)
    offset = offset_bits(inverse_scaler)
    dim = math.prod(train_set[0].shape)
    if len(train_set) < deq.batch_size or len(test_set) == 0:
        raise factory.ConfigError(
            f"{len(train_set)} training and {len(test_set)} test images: the dequantiser needs a "
            f"batch of deq.batch_size={deq.batch_size} training images and a non-empty test "
            "split (lower --config.deq.batch_size or raise --config.data.test_fraction)"
        )
    order = data.EpochOrder(len(train_set), deq.batch_size, seed, stream=0)
    eval_order = data.EpochOrder(len(test_set), min(deq.batch_size, len(test_set)), seed, stream=1)

    # resume, or initialise the actnorm and convolutions on the first batch (the whole global
    # batch, on every rank alike)
    snapshot_dir, meta_dir = deq_dir / "checkpoints", deq_dir / "checkpoints-meta"
    if distributed.is_main():
        for folder in (meta_dir, snapshot_dir):
            for stale in checkpoints.remove_stale_temporaries(folder):
                log.info("removed %s, left by a run killed while writing it", stale)
    found = checkpoints.load_latest(meta_dir, map_location="cpu")
    step = 0
    if found is None:
        first = torch.stack([train_set[int(i)] for i in order.batch_indices(0)])
        first = first.to(device).float() / (NUM_LEVELS - 1)
        init_noise = torch.Generator(device=device).manual_seed(seed + 13)
        dequantizer.initialize(first, torch.randn(first.shape, generator=init_noise, device=device))
        log.info("starting from scratch (no checkpoint in %s)", meta_dir)
    ema = EMA(dequantizer, deq.ema_rate)
    optimizer = adam(dequantizer.parameters(), deq.lr, eps=config.optim.eps)
    if found is not None:
        state, path = found
        hint = (
            f"to resume the dequantiser in {deq_dir}, use the config it was started with "
            f"({deq_dir / 'config.json'}), or use a new --deq_folder"
        )
        checkpoints.load_training_state(state, path, dequantizer, ema, optimizer, hint)
        _set_random_state(state["random"], generators, seed, int(state["step"]))
        step = int(state["step"])
        log.info("resumed from %s at step %d", path, step)
    records.save_json(json.loads(config.to_json()), deq_dir / "config.json")
    log.info("snapshots go to %s, pre-emption checkpoints to %s", snapshot_dir, meta_dir)
    if step >= deq.n_iters:
        log.info("dequantiser training already finished: step %d of %d", step, deq.n_iters)
        return

    # under torchrun: DDP averages the gradients of the ranks' equal-size shards
    call_deq = distributed.wrap_ddp(dequantizer, device)

    def loss_of(
        x_uint8: Tensor,
        generator: torch.Generator,
        net: nn.Module = dequantizer,
        num_times: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """(mean loss in nats, bpd per image) of a uint8 batch."""
        loss, _ = dequantization_loss(
            net, score_fn, sde, x_uint8, scaler, eps, deq.offset, generator, num_times
        )
        return loss.mean(), bits_per_dim(loss.detach(), dim, offset)

    def save(folder: Path, number: int, random_state: dict[str, Any]) -> Path:
        state = {
            "model": dequantizer.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "random": random_state,
            "batch_size": deq.batch_size,
            "seed": seed,
            "config": config.to_json(),
        }
        return checkpoints.save_atomic(state, folder / f"checkpoint_{number}.pth")

    def evaluate_bpd() -> float:
        """Bits/dim of the EMA dequantiser on one held-out batch (the training RNG untouched)."""
        index = step // deq.eval_freq
        with _side_branch(device), torch.no_grad():
            backup = [p.detach().clone() for p in dequantizer.parameters()]
            ema.copy_to(dequantizer)
            dequantizer.eval()
            gen = torch.Generator(device=device).manual_seed(seed + 10_000 + index)
            images = torch.stack([test_set[int(i)] for i in eval_order.batch_indices(index)])
            images = images.to(device)
            bpd = float(loss_of(images, gen, num_times=EVAL_NUM_TIMES)[1].mean())
            for p, b in zip(dequantizer.parameters(), backup, strict=True):
                p.copy_(b)
            dequantizer.train()
        return bpd

    # the loop
    writer = records.ScalarWriter(deq_dir / "tensorboard", purge_step=step + 1 if step else None)
    batches = data.rank_batches(
        train_set, order, step, config.training.num_workers, pin_memory=device.type == "cuda"
    )
    dequantizer.train()
    bar = records.progress(total=deq.n_iters, initial=step, desc="train_deq", unit="step")
    last_time, last_step = time.perf_counter(), step
    try:
        while step < deq.n_iters:
            x = next(batches).to(device, non_blocking=True)
            if config.data.random_flip:
                x = data.random_flip(x, generators["flip"])

            # one optimisation step
            lr = learning_rate(step + 1, deq.lr, deq.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, bpd = loss_of(x, generators["noise"], call_deq)
            # over all ranks, so that every rank takes the same decision
            global_loss = distributed.mean_over_ranks(loss.detach())
            if not torch.isfinite(global_loss):
                raise RuntimeError(
                    f"the dequantiser loss became {float(global_loss)} at step {step + 1}; the "
                    f"last good checkpoint in {meta_dir} is untouched (lower deq.lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(dequantizer.parameters(), deq.grad_clip)
            optimizer.step()
            ema.update(dequantizer)
            step += 1
            bar.update(1)

            # logging
            if step % deq.log_freq == 0 or step == deq.n_iters:
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                train_bpd = float(distributed.mean_over_ranks(bpd.mean()))
                norm = float(grad_norm)
                log.info(
                    "step %d: train bpd %.5f, lr %.3g, grad norm %.3g, %.2f steps/s",
                    step,
                    train_bpd,
                    lr,
                    norm,
                    rate,
                )
                for tag, value in (("train_bpd", train_bpd), ("lr", lr), ("grad_norm", norm)):
                    writer.add(tag, value, step)
                bar.set_postfix(bpd=f"{train_bpd:.4f}")
            if step % deq.eval_freq == 0 or step == deq.n_iters:
                eval_bpd = evaluate_bpd()
                log.info("step %d: eval bpd %.5f (EMA weights, held-out batch)", step, eval_bpd)
                writer.add("eval_bpd", eval_bpd, step)

            # checkpoints
            last = step == deq.n_iters
            preempt = step % deq.snapshot_freq_for_preemption == 0 or last
            snapshot = step % deq.snapshot_freq == 0 or last
            # every rank gathers the random states (a collective); rank 0 alone writes
            random_state = _random_state(generators) if preempt or snapshot else {}
            if preempt and distributed.is_main():
                save(meta_dir, step, random_state)
                checkpoints.prune(meta_dir, KEEP_PREEMPTION)
            if snapshot and distributed.is_main():
                path = save(snapshot_dir, step // deq.snapshot_freq, random_state)
                log.info("step %d: snapshot %s", step, path)
                writer.flush()
    finally:
        bar.close()
        writer.close()
    log.info("dequantiser training finished at step %d", step)
