"""The command line in subprocesses: help, one-line errors with exit status 2, entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DIGITS_CONFIG, ROOT, cli_args, cli_env, run_cli


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("scoreflow: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert fragment in errors[0], errors[0]


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
             "--config.eval.enable_loss=True"],
            "eval.enable_loss",
        ),
    ],
)  # fmt: skip
def test_user_mistakes_give_one_line_and_status_2(args, fragment, tmp_path):
    result = run_cli([a.replace("{w}", str(tmp_path)) for a in args])
    _one_line_error(result, fragment)


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
