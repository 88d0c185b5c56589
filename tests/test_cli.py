"""The command line in subprocesses: help, one-line errors with exit status 2, entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import DIGITS_CONFIG, ROOT, cli_args, cli_env, run_cli
from conftest import assert_one_line_error as _one_line_error

TRAIN = ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "train", "--config.model.nf=8"]
EVAL = ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "eval", "--config.model.nf=8"]


def test_help():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert "--workdir" in result.stdout and "--mode" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "sample"], "unknown --mode"),
        (["--config", "nowhere/config.py", "--workdir", "{w}", "--mode", "train"], "config file"),
        (["--config", DIGITS_CONFIG, "--workdir", "{w}"], "--mode is required"),
        (["--workdir", "{w}", "--mode", "train", "--frobnicate=1"], "frobnicate"),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "train",
             "--config.training.no_such_field=1"],
            "no_such_field",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "train",
             "--config.training.batch_size=many"],
            "batch_size",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "train",
             "--config.training.importance_weighting=True"],
            "likelihood_weighting=True",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "train",
             "--config.training.eval_freq=0"],
            "eval_freq must be at least 1",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "eval",
             "--config.eval.dsm=False"],
            "eval.dsm=False",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "eval",
             "--config.eval.error_norm=max"],
            "eval.error_norm must be one of joint, separate",
        ),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{w}", "--mode", "eval",
             "--config.eval.enable_loss=True"],
            "eval.enable_loss",
        ),
        (["--config", DIGITS_CONFIG, "--workdir", "{f}", "--mode", "train"], "is a file"),
        (
            ["--config", DIGITS_CONFIG, "--workdir", "{f}/run", "--mode", "train",
             "--config.model.nf=8"],
            "Not a directory",
        ),
        pytest.param(
            TRAIN + ["--config.device=cuda"], "--config.device=cuda, but this torch",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available"),
        ),
        (TRAIN + ["--config.device=tpu7"], "unknown device 'tpu7'"),
        (TRAIN + ["--config.data.test_fraction=0"], "data.test_fraction must lie in (0, 1)"),
        (TRAIN + ["--config.model.nf=0"], "model.nf must be a positive integer"),
        (TRAIN + ["--config.model.ch_mult=(1,0)"], "model.ch_mult"),
        (TRAIN + ["--config.training.smallest_time=0"], "smallest_time (eps) must lie in (0, 1)"),
        (TRAIN + ["--config.training.smallest_time=1.5"], "smallest_time (eps) must lie in"),
        (TRAIN + ["--config.training.batch_size=5000"], "fewer than one batch of 5000"),
        (TRAIN + ["--config.model.ch_mult=1,2,x"], "model.ch_mult must be a non-empty list"),
        # sampler settings are checked at the start, not when the first snapshot is sampled
        (TRAIN + ["--config.sampling.method=ddim"], "unknown sampling.method 'ddim'"),
        (TRAIN + ["--config.sampling.method=pc", "--config.sampling.predictor=euler"],
         "unknown predictor 'euler'"),
        (TRAIN + ["--config.sampling.method=pc", "--config.sampling.predictor=reverse_diffusion",
                  "--config.sampling.num_steps=10"], "num_steps > 21"),
        (TRAIN + ["--config.training.sde=subvpsde", "--config.sampling.method=pc",
                  "--config.sampling.predictor=ancestral"], "not supported: the ancestral"),
        (EVAL + ["--config.eval.batch_size=0"], "eval.batch_size must be at least 1"),
        (EVAL + ["--config.eval.num_repeats=0"], "eval.num_repeats must be at least 1"),
        (EVAL + ["--config.eval.max_images=-3"], "eval.max_images must be 0"),
        (EVAL + ["--config.eval.enable_bpd=False"], "--mode eval has nothing to do"),
        (EVAL + ["--config.eval.enable_sampling=True", "--config.eval.stats_file={w}/no.npz"],
         "FID statistics file"),
    ],
)  # fmt: skip
def test_user_mistakes_give_one_line_and_status_2(args, fragment, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    args = [a.replace("{w}", str(tmp_path / "run")).replace("{f}", str(a_file)) for a in args]
    result = run_cli(args)
    _one_line_error(result, fragment)
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_data_file_from_the_driver(tmp_path):
    args = ["--config", DIGITS_CONFIG, "--workdir", str(tmp_path), "--mode", "train",
            "--config.data.dataset=CIFAR10", f"--config.data.root={tmp_path / 'none'}",
            "--config.model.nf=8"]  # fmt: skip
    _one_line_error(run_cli(args), "CIFAR-10")


def test_entry_points_agree(tmp_path):
    """``python main.py`` and the ``scoreflow`` console script behave like ``-m scoreflow``."""
    args = ["--config", DIGITS_CONFIG, "--workdir", str(tmp_path), "--mode", "bogus"]
    via_main = subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=cli_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    _one_line_error(via_main, "unknown --mode")
    script = ROOT / ".venv" / "bin" / "scoreflow"
    if script.exists():
        via_script = subprocess.run(
            [str(script), *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        _one_line_error(via_script, "unknown --mode")


def test_diverging_run_exits_with_status_1_and_one_line(tmp_path):
    from scoreflow import checkpoints

    args = cli_args(
        tmp_path,
        **{
            "optim.lr": 1e30,
            "optim.warmup": 0,
            "training.n_iters": 20,
            "training.snapshot_freq_for_preemption": 1,
        },
    )
    result = run_cli(args)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("scoreflow: error:")]
    assert len(errors) == 1 and "the training loss became" in errors[0]
    assert "Traceback" not in result.stderr
    saved = checkpoints.list_checkpoints(tmp_path / "checkpoints-meta")
    assert [n for n, _ in saved] == [1]  # written before the loss went bad; nothing after
