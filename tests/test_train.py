"""The training driver: the three weightings end to end through the command line (and the
distribution of t that importance sampling draws in the loop), what lands in the workdir,
TensorBoard after a resume, and the device options (bf16 autocast, channels_last and compile,
on the CPU). The data order and preprocessing are tested in test_data."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from conftest import cli_args, preempted_at_step, run_cli, tiny_config

from scoreflow import checkpoints, factory, losses
from scoreflow.train import _device_options, train


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


def test_channels_last_and_sampling_hook_leave_training_unchanged(tmp_path, monkeypatch):
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
    options = {"training.channels_last": True, "training.snapshot_sampling": True}
    train(tiny_config(**short, **options), tmp_path / "options")

    assert calls == [5, 10]
    log = (tmp_path / "options" / "stdout.txt").read_text()
    assert "training.channels_last" in log
    a, b = (
        checkpoints.load_checkpoint(tmp_path / run / "checkpoints-meta" / "checkpoint_10.pth")
        for run in ("plain", "options")
    )
    assert any(
        v.is_contiguous(memory_format=torch.channels_last)
        and v.dim() == 4
        and v.shape[-1] > 1
        and not v.is_contiguous()
        for v in b["model"].values()
    )
    for key, value in a["model"].items():
        # the same arithmetic in another memory layout: equal up to float32 rounding
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)

    # a finished run started again does nothing
    train(tiny_config(**short), tmp_path / "plain")
    assert "training already finished" in (tmp_path / "plain" / "stdout.txt").read_text()


def _importance_cdf(t: np.ndarray, beta_min: float, beta_max: float, eps: float) -> np.ndarray:
    """CDF of p(t) proportional to g^2 / std^2 = beta(t) / (1 - exp(-B(t))) on [eps, 1] for the
    VP SDE, by the trapezoidal rule on a fine logarithmic grid (independent of the sampler)."""
    grid = np.geomspace(eps, 1.0, 200_001)
    integrated = beta_min * grid + 0.5 * (beta_max - beta_min) * grid**2
    density = (beta_min + grid * (beta_max - beta_min)) / -np.expm1(-integrated)
    cumulative = np.concatenate([[0.0], np.cumsum(np.diff(grid) * (density[1:] + density[:-1]))])
    return np.interp(t, grid, cumulative / cumulative[-1])


def test_the_loop_draws_t_from_the_importance_density(tmp_path, monkeypatch, no_progress):
    draws = []
    real = losses.sample_times

    def spy(sde, batch_size, weighting, eps, *args, **kwargs):
        t = real(sde, batch_size, weighting, eps, *args, **kwargs)
        draws.append((weighting, t))
        return t

    monkeypatch.setattr(losses, "sample_times", spy)
    config = tiny_config(**{
        "training.likelihood_weighting": True, "training.importance_weighting": True,
        "training.n_iters": 25, "training.eval_freq": 1000,
    })  # fmt: skip
    train(config, tmp_path)

    assert len(draws) == 25 and {weighting for weighting, _ in draws} == {"importance"}
    t = torch.cat([t for _, t in draws]).double().numpy()
    eps = config.training.smallest_time
    assert t.min() >= eps and t.max() <= 1.0
    # the empirical CDF at a few times against the density's, within 4.5 binomial deviations
    # (uniform t, as under the other weightings, would put 1% below t = 0.01 instead of ~30%)
    points = np.array([1e-3, 1e-2, 1e-1, 0.5])
    expected = _importance_cdf(points, config.model.beta_min, config.model.beta_max, eps)
    observed = (t[:, None] <= points).mean(axis=0)
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / t.size)
    assert np.all(np.abs(observed - expected) < tolerance), (observed, expected)


def test_tensorboard_hides_the_steps_logged_after_the_checkpoint_of_a_resume(
    tmp_path, monkeypatch, no_progress
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    config = tiny_config(**{
        "training.n_iters": 10, "training.log_freq": 1, "training.eval_freq": 1000,
        "training.snapshot_freq": 1000,
    })  # fmt: skip
    with preempted_at_step(monkeypatch, 8), pytest.raises(KeyboardInterrupt):
        train(config, tmp_path)  # steps 1-7 logged, the last checkpoint at step 5
    train(config, tmp_path)

    # the resumed run's event file starts a session at step 6: TensorBoard then drops the
    # interrupted run's events from step 6 on (those of steps 6 and 7)
    starts = []
    for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                starts.append(event.step)
    assert starts == [6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 11))


@pytest.mark.slow
def test_compile_option_trains_on_the_cpu(tmp_path, monkeypatch):
    """training.compile=True compiles the network on the CPU too (inductor's C++ build takes
    about a minute even for the tiny network) and follows the eager run's losses."""
    monkeypatch.setenv("SCOREFLOW_NO_PROGRESS", "1")
    short = {"training.n_iters": 3, "training.log_freq": 1, "training.eval_freq": 1000}
    train(tiny_config(**short), tmp_path / "eager")
    train(tiny_config(**short, **{"training.compile": True}), tmp_path / "compiled")
    assert "training.compile" in (tmp_path / "compiled" / "stdout.txt").read_text()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
