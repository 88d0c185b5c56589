"""The training driver: data order, preprocessing, warm-up, the three weightings end to end
through the command line, what lands in the workdir, and the device options (bf16 autocast on
the CPU; channels_last and compile, which are no-ops there)."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import pytest
import torch
from conftest import cli_args, run_cli, tiny_config

from scoreflow import checkpoints, factory, losses
from scoreflow.train import EpochOrder, _device_options, preprocess, train


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    order = EpochOrder(n=50, batch_size=8, seed=3)
    assert order.steps_per_epoch == 6  # the last 2 examples of each epoch are dropped
    epoch0 = torch.cat([order.batch_indices(i) for i in range(6)])
    assert epoch0.unique().numel() == 48 and int(epoch0.max()) < 50
    epoch1 = torch.cat([order.batch_indices(i) for i in range(6, 12)])
    assert not torch.equal(epoch0, epoch1)
    # a fresh object (a resumed run) asked for batch 9 first gets the same indices
    assert torch.equal(EpochOrder(50, 8, seed=3).batch_indices(9), order.batch_indices(9))
    assert order.position(9) == (1, 3)
    assert not torch.equal(EpochOrder(50, 8, seed=4).batch_indices(0), order.batch_indices(0))


def test_preprocess_dequantisation_and_flip():
    x = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    plain = preprocess(x, lambda v: v, gen)
    torch.testing.assert_close(plain, x.float() / 255)

    y = preprocess(x, lambda v: v, gen, uniform_dequantization=True)
    assert (y >= x.float() / 256).all() and (y < (x.float() + 1) / 256).all()

    flipped = preprocess(x, lambda v: 2 * v - 1, gen, random_flip=True)
    same = (flipped == plain * 2 - 1).flatten(1).all(1)
    mirrored = (flipped == (plain * 2 - 1).flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 120 < int((mirrored & ~same).sum()) < 280  # about half of 400


def _losses(workdir) -> list[float]:
    with open(workdir / "curve.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]


@pytest.mark.parametrize(
    "weighting, flags",
    [
        ("baseline", {}),
        ("likelihood", {"training.likelihood_weighting": True}),
        (
            "importance",
            {"training.likelihood_weighting": True, "training.importance_weighting": True},
        ),
    ],
)
def test_each_weighting_trains_through_the_cli(weighting, flags, tmp_path):
    result = run_cli(cli_args(tmp_path, **flags))
    assert result.returncode == 0, result.stderr[-2000:]

    log = (tmp_path / "stdout.txt").read_text()
    assert f"weighting {weighting}" in log and "parameters" in log
    assert "training finished at step 40" in log
    values = _losses(tmp_path)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    if weighting != "likelihood":
        # the untrained network predicts zero noise: loss E||z||^2 / D = 1 per dimension
        assert values[-1] < 1.0

    # what lands in the workdir
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["training"]["likelihood_weighting"] == (weighting != "baseline")
    assert sorted(n for n, _ in checkpoints.list_checkpoints(tmp_path / "checkpoints")) == [1, 2]
    assert [n for n, _ in checkpoints.list_checkpoints(tmp_path / "checkpoints-meta")] == [35, 40]
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = {"loss", "eval_loss", "lr", "grad_norm", "steps_per_sec"}
    assert tags <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_loss")] == [20, 40]


def test_bf16_autocast_gives_the_float32_loss_to_bf16_precision_on_the_cpu(tmp_path, no_progress):
    config = tiny_config(**{"training.amp": True, "training.n_iters": 5})
    sde = factory.get_sde(config)
    torch.manual_seed(0)
    model = factory.get_model(config)
    with torch.no_grad():  # a network whose output is not the near-zero one of init_scale 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.rand(8, generator=gen) * 0.9 + 0.05
    z = torch.randn(x.shape, generator=gen)

    call_model, autocast = _device_options(config, model, torch.device("cpu"))
    with torch.no_grad():
        reference, _ = losses.dsm_loss(sde, model, x, "baseline", t=t, z=z)
    with torch.no_grad(), autocast():
        assert call_model(x, t * 999).dtype == torch.bfloat16
        loss, _ = losses.dsm_loss(sde, call_model, x, "baseline", t=t, z=z)
    relative = abs(float(loss) - float(reference)) / float(reference)
    assert 0 < relative < 1e-2  # bf16 did run (not bit-equal), within its 8-bit mantissa

    train(config, tmp_path)
    log = (tmp_path / "stdout.txt").read_text()
    assert "bf16 autocast" in log and "training finished at step 5" in log
    assert all(math.isfinite(v) for v in _losses(tmp_path))


def test_cpu_noop_options_and_sampling_hook_leave_training_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREFLOW_NO_PROGRESS", "1")
    short = {"training.n_iters": 10, "training.snapshot_freq": 5, "training.eval_freq": 5}
    train(tiny_config(**short), tmp_path / "plain")

    calls = []

    def snapshot_samples(config, sde, model, step, workdir):
        calls.append(step)
        torch.randn(1000)  # a sampler draws from the global generator; training must not notice

    fake = types.ModuleType("scoreflow.evaluate_sampling")
    fake.snapshot_samples = snapshot_samples
    monkeypatch.setitem(sys.modules, "scoreflow.evaluate_sampling", fake)
    options = {
        "training.channels_last": True,
        "training.compile": True,
        "training.snapshot_sampling": True,
    }
    train(tiny_config(**short, **options), tmp_path / "options")

    assert calls == [5, 10]
    log = (tmp_path / "options" / "stdout.txt").read_text()
    assert "training.channels_last" in log and "training.compile" in log
    a, b = (
        checkpoints.load_checkpoint(tmp_path / run / "checkpoints-meta" / "checkpoint_10.pth")
        for run in ("plain", "options")
    )
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    # a finished run started again does nothing
    train(tiny_config(**short), tmp_path / "plain")
    assert "training already finished" in (tmp_path / "plain" / "stdout.txt").read_text()
