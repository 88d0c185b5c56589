"""The evaluation driver: every image evaluated, exact resumption, batch-independent values,
the dequantiser and sampling hooks, and the report's files."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import scoreflow.evaluate as evaluate_module
from scoreflow import checkpoints, factory
from scoreflow.ema import EMA
from scoreflow.evaluate import evaluate, image_generators
from scoreflow.likelihood import ode_likelihood
from scoreflow.score import get_score_fn

ROOT = Path(__file__).resolve().parents[1]


def small_config():
    config = factory.load_config_file(ROOT / "configs/small/digits_vp.py")
    config.device = "cpu"
    evaluation = config.eval
    evaluation.max_images = 5
    evaluation.batch_size = 2
    evaluation.num_repeats = 2
    evaluation.rtol = evaluation.atol = 1e-3
    evaluation.begin_ckpt = evaluation.end_ckpt = 1
    evaluation.bound_num_times = 10
    return config


class TinyScoreModel(nn.Module):
    """A stand-in score network with the NCSNpp calling convention model(x, time_cond)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.time = nn.Linear(1, 4)

    def forward(self, x, time_cond):
        h = torch.tanh(self.conv(x) + self.time(time_cond[:, None] / 1000)[:, :, None, None])
        return 0.1 * self.out(h)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SCOREFLOW_NO_PROGRESS", "1")


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(factory, "get_model", lambda config: TinyScoreModel())


def write_snapshot(workdir: Path, model: nn.Module, number: int, step: int) -> None:
    state = {"model": model.state_dict(), "ema": EMA(model, 0.99).state_dict(), "step": step}
    checkpoints.save_atomic(state, workdir / "checkpoints" / f"checkpoint_{number}.pth")


def tiny_workdir(tmp_path: Path, name: str, snapshots=(1,)) -> Path:
    workdir = tmp_path / name
    for k in snapshots:
        torch.manual_seed(k)
        write_snapshot(workdir, TinyScoreModel(), k, 100 * k)
    return workdir


def load_bpd(workdir: Path, ckpt: int, method: str, dequantization="uniform") -> np.ndarray:
    return np.load(workdir / "eval" / f"bpd_ckpt_{ckpt}_{method}_{dequantization}.npz")["bpd"]


def test_every_image_is_evaluated_and_the_report_is_complete(tmp_path, tiny_model):
    config = small_config()
    config.eval.end_ckpt = 2
    workdir = tiny_workdir(tmp_path, "run", snapshots=(1, 2))
    report = evaluate(config, workdir, "eval")

    arrays = np.load(workdir / "eval" / "bpd_ckpt_1_ode_uniform.npz")
    assert arrays["bpd"].shape == (2, 5) and np.isfinite(arrays["bpd"]).all()
    assert arrays["nfe"].shape == (2, 3) and (arrays["nfe"] > 0).all()  # 2 + 2 + 1 images
    dim = 64
    expected = (arrays["nll_nats"] + arrays["log_q"]) / (dim * math.log(2)) + 7.0
    np.testing.assert_allclose(arrays["bpd"], expected)

    entry = report["checkpoints"]["1_ode_uniform"]
    per_image = arrays["bpd"].mean(axis=0)
    assert entry["bpd"] == pytest.approx(per_image.mean())
    assert entry["bpd_stderr"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(5))
    for key in (
        "method",
        "dequantization",
        "num_images",
        "num_repeats",
        "nfe_mean",
        "checkpoint",
        "seconds",
        "dataset",
        "data_source",
        "step",
    ):
        assert key in entry
    assert entry["method"] == "ode" and entry["dequantization"] == "uniform"
    assert entry["num_images"] == 5 and entry["num_repeats"] == 2
    assert "digits" in entry["data_source"]
    assert json.loads((workdir / "eval" / "report.json").read_text()) == report
    assert set(report["checkpoints"]) == {"1_ode_uniform", "2_ode_uniform"}
    assert (workdir / "eval" / "bpd_curve.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["ode", "bound"])
def test_killed_evaluation_resumes_to_the_same_numbers(tmp_path, tiny_model, monkeypatch, method):
    config = small_config()
    config.eval.bound = method == "bound"
    reference_dir = tiny_workdir(tmp_path, "uninterrupted")
    evaluate(config, reference_dir, "eval")
    reference = load_bpd(reference_dir, 1, method)

    workdir = tiny_workdir(tmp_path, "killed")
    real_batch = evaluate_module.bpd_batch
    calls = []

    def dies_on_the_fourth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "bpd_batch", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, workdir, "eval")
    assert not (workdir / "eval" / f"bpd_ckpt_1_{method}_uniform.npz").exists()

    calls.clear()
    evaluate(config, workdir, "eval")
    assert len(calls) == 6 - 3  # only the batches not yet done
    np.testing.assert_allclose(load_bpd(workdir, 1, method), reference, rtol=0, atol=1e-6)


def test_bound_values_do_not_depend_on_the_batching(tmp_path, tiny_model):
    """Per-image work is a function of (seed, repeat, image index): batch size 2 and 5 agree."""
    config = small_config()
    config.eval.bound = True
    first = tiny_workdir(tmp_path, "batch2")
    evaluate(config, first, "eval")
    config.eval.batch_size = 5
    second = tiny_workdir(tmp_path, "batch5")
    evaluate(config, second, "eval")
    np.testing.assert_allclose(
        load_bpd(first, 1, "bound"), load_bpd(second, 1, "bound"), rtol=0, atol=1e-4
    )


def write_dequantizer(workdir: Path, config, seed: int, number: int = 3) -> nn.Module:
    """A Flow++ dequantiser snapshot (initialised on a batch) in the dequantiser's folder."""
    torch.manual_seed(seed)
    flow = factory.get_dequantizer(config)
    with torch.no_grad():
        flow(torch.rand(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
    state = {"model": flow.state_dict(), "ema": EMA(flow, 0.99).state_dict(), "step": 7}
    path = workdir / "flowpp_dequantizer" / "checkpoints" / f"checkpoint_{number}.pth"
    checkpoints.save_atomic(state, path)
    return flow.eval()


def test_variational_dequantizer_and_sampling_hook(tmp_path, tiny_model, monkeypatch):
    config = small_config()
    config.eval.bound = True
    config.eval.dequantizer = True
    config.eval.enable_sampling = True
    workdir = tiny_workdir(tmp_path, "deq")
    write_dequantizer(workdir, config, seed=0)

    received = {}

    def run_sampling_eval(config, sde, model, eval_dir, ckpt_id):
        received.update(eval_dir=eval_dir, ckpt_id=ckpt_id)
        return {"fid": 12.5, "sampling_nfe_mean": 99.0}

    fake = types.ModuleType("scoreflow.evaluate_sampling")
    fake.run_sampling_eval = run_sampling_eval
    fake.check_stats_file = lambda config: None
    monkeypatch.setitem(sys.modules, "scoreflow.evaluate_sampling", fake)

    report = evaluate(config, workdir, "eval")
    entry = report["checkpoints"]["1_bound_variational"]
    assert entry["dequantization"] == "variational" and entry["method"] == "bound"
    assert entry["fid"] == 12.5 and received["ckpt_id"] == 1
    # the bound's evaluations (10 times + the offset) are kept beside the sampler's
    assert entry["nfe_mean"] == 11 and entry["sampling_nfe_mean"] == 99.0
    assert entry["dequantizer_checkpoint"].endswith("checkpoint_3.pth")
    log_q = np.load(workdir / "eval" / "bpd_ckpt_1_bound_variational.npz")["log_q"]
    assert np.isfinite(log_q).all() and (log_q != 0).any()


def test_variational_bpd_adds_log_q_to_the_ode_value(tmp_path, tiny_model):
    """bits/dim with the dequantiser, assembled by hand: ODE -log p(y) plus log q(u | x), in
    bits, plus 7 (8 bits, data centred to [-1, 1]), for every image and repeat."""
    config = small_config()
    config.eval.dequantizer = True
    workdir = tiny_workdir(tmp_path, "deq")
    flow = write_dequantizer(workdir, config, seed=0)
    evaluate(config, workdir, "eval")
    bpd = load_bpd(workdir, 1, "ode", "variational")

    state = checkpoints.load_checkpoint(workdir / "checkpoints" / "checkpoint_1.pth")
    model = TinyScoreModel()
    checkpoints.restore_ema_weights(model, state)
    model.eval().requires_grad_(False)
    sde = factory.get_sde(config)
    score_fn = get_score_fn(sde, model)
    images = factory.get_datasets(config)[1].images[:5]
    dim, seed, evaluation = 64, config.seed, config.eval
    for repeat in range(2):
        for lo in range(0, 5, 2):
            indices = list(range(lo, min(lo + 2, 5)))
            deq = image_generators(seed, repeat, indices, 0, torch.device("cpu"))
            probes = image_generators(seed, repeat, indices, 1, torch.device("cpu"))
            # Flow++ maps noise and x / 255 to u with log q(u | x); y = (x + u) / 256
            noise = torch.stack([torch.randn(1, 8, 8, generator=g) for g in deq])
            x_int = images[indices].float()
            with torch.no_grad():
                u, log_q = flow(x_int / 255, noise)
            y = (x_int + u) / 256
            result = ode_likelihood(
                score_fn,
                sde,
                2 * y - 1,
                eps=config.training.smallest_time,
                rtol=evaluation.rtol,
                atol=evaluation.atol,
                generator=probes,
            )
            expected = (-result.logp + log_q) / (dim * math.log(2)) + 7
            np.testing.assert_allclose(bpd[repeat, indices], expected.numpy(), atol=1e-4)


def test_results_follow_the_dequantizer_and_keep_uniform_ones(tmp_path, tiny_model):
    """A dequantiser trained anew is evaluated anew (not resumed from the old one's results),
    and uniform and variational results live side by side in one folder."""
    config = small_config()
    config.eval.bound = True
    workdir = tiny_workdir(tmp_path, "run")
    evaluate(config, workdir, "eval")
    config.eval.dequantizer = True
    write_dequantizer(workdir, config, seed=0)
    evaluate(config, workdir, "eval")
    first = load_bpd(workdir, 1, "bound", "variational")

    write_dequantizer(workdir, config, seed=1)  # the same file name, other weights
    report = evaluate(config, workdir, "eval")
    fresh = tiny_workdir(tmp_path, "fresh")
    write_dequantizer(fresh, config, seed=1)
    evaluate(config, fresh, "eval")
    second = load_bpd(workdir, 1, "bound", "variational")
    np.testing.assert_allclose(second, load_bpd(fresh, 1, "bound", "variational"), atol=1e-6)
    assert np.abs(second - first).max() > 1e-3
    assert set(report["checkpoints"]) == {"1_bound_uniform", "1_bound_variational"}
    assert np.isfinite(load_bpd(workdir, 1, "bound", "uniform")).all()


def test_missing_files_give_one_line_errors(tmp_path, tiny_model):
    config = small_config()
    with pytest.raises(FileNotFoundError, match="begin_ckpt"):
        evaluate(config, tmp_path / "empty", "eval")
    config.eval.dequantizer = True
    workdir = tiny_workdir(tmp_path, "nodeq")
    with pytest.raises(FileNotFoundError, match="train_deq"):
        evaluate(config, workdir, "eval")


def test_real_small_network_bound(tmp_path):
    """The DDPM++ of the small digits config, end to end through the factory."""
    config = small_config()
    config.eval.bound = True
    config.eval.num_repeats = 1
    torch.manual_seed(0)
    workdir = tmp_path / "ncsnpp"
    write_snapshot(workdir, factory.get_model(config), 1, 1000)
    report = evaluate(config, workdir, "eval")
    assert math.isfinite(report["checkpoints"]["1_bound_uniform"]["bpd"])


def test_a_config_unlike_the_training_one_is_named(tmp_path, tiny_model, monkeypatch, caplog):
    """Evaluating under another SDE than the one trained would give the figures of another
    model; the run's config.json says which fields differ. A checkpoint that does not fit
    the network points to that file."""
    config = small_config()
    config.eval.max_images, config.eval.num_repeats = 2, 1
    workdir = tiny_workdir(tmp_path, "other_sde")
    trained = json.loads(config.to_json())
    trained["training"]["sde"] = "subvpsde"
    trained["model"]["dropout"] = 0.3  # acts only during training: not a difference
    (workdir / "config.json").write_text(json.dumps(trained))
    with caplog.at_level("WARNING", logger="scoreflow.evaluate"):
        evaluate(config, workdir, "eval")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "training.sde ('vpsde' here, 'subvpsde' in training)" in warnings[0]
    assert "dropout" not in warnings[0]

    wider = nn.Module()
    wider.conv = nn.Conv2d(1, 8, 3, padding=1)
    monkeypatch.setattr(factory, "get_model", lambda config: wider)
    with pytest.raises(checkpoints.CheckpointError, match="evaluate with the config the run"):
        evaluate(config, workdir, "eval_wider")
