"""Checkpoints of the training driver: bit-exact resumption after SIGKILL, skipping a truncated
checkpoint, atomic writes, no checkpoint of diverged weights, the log appended on resume."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_args, cli_env, tiny_config

from scoreflow import checkpoints, losses
from scoreflow.train import TrainingDivergedError, train

N_ITERS = 40


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of N_ITERS steps; returns its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCOREFLOW_NO_PROGRESS", "1")
    try:
        train(tiny_config(**{"training.n_iters": N_ITERS}), workdir)
    finally:
        mp.undo()
    return workdir


def _final_state(workdir: Path) -> dict:
    state = checkpoints.load_checkpoint(workdir / "checkpoints-meta" / f"checkpoint_{N_ITERS}.pth")
    assert state["step"] == N_ITERS
    return state


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            if isinstance(a[part][key], torch.Tensor):
                assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_sigkill_then_resume_equals_uninterrupted_run(reference_run, tmp_path, no_progress):
    workdir = tmp_path / "killed"
    meta = workdir / "checkpoints-meta"
    rng = random.Random()
    wanted = rng.choice(range(5, N_ITERS - 5, 5))
    cmd = [sys.executable, "-m", "scoreflow", *cli_args(workdir, **{"training.n_iters": N_ITERS})]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(n >= wanted for n, _ in checkpoints.list_checkpoints(meta)):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # possibly in the middle of the next write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = [n for n, _ in checkpoints.list_checkpoints(meta)]
    assert saved, "the killed run wrote no pre-emption checkpoint"
    assert max(saved) < N_ITERS, "the run finished before it was killed"

    train(tiny_config(**{"training.n_iters": N_ITERS}), workdir)

    _assert_same_weights(_final_state(workdir), _final_state(reference_run))
    # the log of the killed run is kept and the resumed run's is appended
    log = (workdir / "stdout.txt").read_text()
    assert log.count("score model:") == 2
    assert "resumed from" in log
    # the newest two pre-emption checkpoints are kept
    assert [n for n, _ in checkpoints.list_checkpoints(meta)] == [N_ITERS - 5, N_ITERS]


def test_truncated_latest_checkpoint_is_skipped(reference_run, tmp_path, no_progress, caplog):
    import shutil

    workdir = tmp_path / "truncated"
    shutil.copytree(reference_run, workdir)
    meta = workdir / "checkpoints-meta"
    newest = meta / f"checkpoint_{N_ITERS}.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    found = checkpoints.load_latest(meta)
    assert found is not None and found[1].name == f"checkpoint_{N_ITERS - 5}.pth"

    # resuming from the previous checkpoint redoes the last steps and ends where the reference did
    newest.unlink()
    (meta / f"checkpoint_{N_ITERS + 5}.pth").write_bytes(b"not a checkpoint")
    train(tiny_config(**{"training.n_iters": N_ITERS}), workdir)
    assert "skipping unreadable checkpoint" in (workdir / "stdout.txt").read_text()
    _assert_same_weights(_final_state(workdir), _final_state(reference_run))


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_1.pth"
    checkpoints.save_atomic({"w": torch.arange(10)}, path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_atomic({"w": torch.zeros(10)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1.pth"]
    monkeypatch.undo()
    assert torch.equal(checkpoints.load_checkpoint(path)["w"], torch.arange(10))


def test_nan_loss_stops_without_a_bad_checkpoint(tmp_path, monkeypatch, no_progress):
    real = losses.dsm_loss
    calls = {"n": 0}

    def nan_after_twelve(*args, **kwargs):
        loss, per_example = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 12:
            return loss * float("nan"), per_example
        return loss, per_example

    monkeypatch.setattr(losses, "dsm_loss", nan_after_twelve)
    config = tiny_config(**{"training.n_iters": 30, "training.eval_freq": 1000})
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 13"):
        train(config, tmp_path)
    saved = checkpoints.list_checkpoints(tmp_path / "checkpoints-meta")
    assert [n for n, _ in saved] == [5, 10]
    state = checkpoints.load_checkpoint(saved[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_atomic_writes_get_the_permissions_of_an_ordinary_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoints.save_atomic({"step": 1}, tmp_path / "a.pth")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == (
        tmp_path / "b.txt"
    ).stat().st_mode & 0o777
    assert not list(tmp_path.glob(".*.tmp"))
