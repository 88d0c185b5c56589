"""Shared fixtures: a tiny training config and a runner of the command line in a subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from scoreflow.factory import load_config_file

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = str(ROOT / "configs" / "small" / "digits_vp.py")

# the small digits config shrunk further: a network of ~50k parameters, short runs
TINY = {
    "model.nf": 8,
    "training.batch_size": 16,
    "training.n_iters": 40,
    "training.log_freq": 10,
    "training.eval_freq": 20,
    "training.snapshot_freq": 20,
    "training.snapshot_freq_for_preemption": 5,
    "training.snapshot_sampling": False,
    "eval.batch_size": 16,
}

# keyword arguments of a tiny DDPM++ (NCSNpp) on 8x8x3 images, for tests of the network itself
TINY_NCSNPP = dict(
    image_size=8,
    num_channels=3,
    nf=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    dropout=0.1,
    resamp_with_conv=True,
    conditional=True,
    skip_rescale=True,
    resblock_type="biggan",
    init_scale=0.0,
    embedding_type="positional",
    fourier_scale=16.0,
    scale_by_sigma=False,
    centered=True,
    sigma_min=0.01,
    sigma_max=50.0,
    num_scales=1000,
)


def tiny_config(**overrides):
    """The digits VP config with :data:`TINY` and ``overrides`` ("training.n_iters"=...)."""
    config = load_config_file(DIGITS_CONFIG)
    for key, value in {**TINY, **overrides}.items():
        section, field = key.rsplit(".", 1)
        setattr(_section(config, section), field, value)
    return config


def _section(config, dotted: str):
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def cli_args(workdir, mode: str = "train", config: str = DIGITS_CONFIG, **overrides) -> list[str]:
    """Command-line arguments of a tiny run: --config, --workdir, --mode and the overrides."""
    args = ["--config", config, "--workdir", str(workdir), "--mode", mode]
    for key, value in {**TINY, **overrides}.items():
        args.append(f"--config.{key}={value}")
    return args


def cli_env() -> dict[str, str]:
    """The environment of a command-line subprocess: one thread, no progress bars, this repo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SCOREFLOW_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    return env


def run_cli(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m scoreflow ARGS`` in a subprocess, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "scoreflow", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    """Assert exit status 2 and exactly one ``scoreflow: error:`` line, without a traceback,
    that contains ``fragment``; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("scoreflow: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert fragment in errors[0], errors[0]
    return errors[0]


@contextmanager
def preempted_at_step(monkeypatch, step: int) -> Iterator[None]:
    """Within the block a driver is stopped by KeyboardInterrupt (a simulated pre-emption) when
    it logs its first scalar of ``step``, after the checkpoints of the steps before it."""
    from scoreflow import records

    real_add = records.ScalarWriter.add

    def add_or_die(self, tag, value, at_step):
        if at_step == step:
            raise KeyboardInterrupt("simulated pre-emption")
        real_add(self, tag, value, at_step)

    monkeypatch.setattr(records.ScalarWriter, "add", add_or_die)
    try:
        yield
    finally:
        monkeypatch.setattr(records.ScalarWriter, "add", real_add)


@pytest.fixture
def no_progress(monkeypatch):
    """Silence tqdm bars of in-process runs."""
    monkeypatch.setenv("SCOREFLOW_NO_PROGRESS", "1")


@pytest.fixture
def console_log(capsys):
    """capsys for an in-process command that sets up console logging on the captured stderr;
    the root logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield capsys
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
