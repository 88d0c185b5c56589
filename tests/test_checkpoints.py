"""Checkpoints of the training driver: bit-exact resumption after SIGKILL, skipping a truncated
checkpoint, atomic writes and the removal of their leftovers, no checkpoint of diverged weights,
the log appended on resume, a one-line error for a checkpoint of another model, and generator
states saved on another kind of device."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_one_line_error, cli_args, cli_env, run_cli, tiny_config

from scoreflow import checkpoints, losses
from scoreflow.train import TrainingDivergedError, train

# the reference run: N_ITERS steps with a snapshot (kept for good) every 5 steps, so that any
# multiple of 5 up to N_ITERS can be compared with it
N_ITERS = 100
EVERY_5 = {"training.snapshot_freq": 5, "training.snapshot_freq_for_preemption": 5}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of N_ITERS steps; returns its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCOREFLOW_NO_PROGRESS", "1")
    try:
        train(tiny_config(**{**EVERY_5, "training.n_iters": N_ITERS}), workdir)
    finally:
        mp.undo()
    return workdir


def _meta_state(workdir: Path, step: int) -> dict:
    state = checkpoints.load_checkpoint(workdir / "checkpoints-meta" / f"checkpoint_{step}.pth")
    assert state["step"] == step
    return state


def _reference_state(reference: Path, step: int) -> dict:
    """The reference run's weights at ``step`` (a multiple of 5): its snapshot step // 5."""
    state = checkpoints.load_checkpoint(reference / "checkpoints" / f"checkpoint_{step // 5}.pth")
    assert state["step"] == step
    return state


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            if isinstance(a[part][key], torch.Tensor):
                assert torch.equal(a[part][key], b[part][key]), (part, key)


def _temporaries(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("checkpoints*/.checkpoint_*.tmp"))


def test_sigkill_then_resume_equals_uninterrupted_run(reference_run, tmp_path, no_progress):
    # SIGKILL a run that cannot finish (10^4 steps) at a random moment after its pre-emption
    # checkpoint `wanted`, possibly in the middle of writing a checkpoint; resume it to 10 steps
    # past its last checkpoint and compare with the reference run at that step.
    # SCOREFLOW_KILL_SEED=<seed> repeats a choice.
    seed = int(os.environ.get("SCOREFLOW_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    wanted, delay = rng.choice(range(5, 25, 5)), rng.uniform(0.0, 0.3)
    print(f"SCOREFLOW_KILL_SEED={seed}: kill {delay:.3f} s after checkpoint {wanted} appears")
    workdir = tmp_path / "killed"
    meta = workdir / "checkpoints-meta"
    args = cli_args(workdir, **{**EVERY_5, "training.n_iters": 10_000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "scoreflow", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(n >= wanted for n, _ in checkpoints.list_checkpoints(meta)):
            assert proc.poll() is None, "the run to be killed ended by itself"
            assert time.monotonic() < deadline, f"no checkpoint {wanted} within 240 s"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    saved = [n for n, _ in checkpoints.list_checkpoints(meta)]
    print(f"killed with pre-emption checkpoints {saved}, leftovers {_temporaries(workdir)}")
    final = max(saved) + 10
    assert final <= N_ITERS, f"the killed run got to step {max(saved)}, beyond the reference"

    train(tiny_config(**{**EVERY_5, "training.n_iters": final}), workdir)

    _assert_same_weights(_meta_state(workdir, final), _reference_state(reference_run, final))
    # the log of the killed run is kept and the resumed run's is appended
    log = (workdir / "stdout.txt").read_text()
    assert log.count("score model:") == 2
    assert f"resumed from {meta / f'checkpoint_{max(saved)}.pth'}" in log
    # the newest two pre-emption checkpoints are kept; no half-written file is left
    assert [n for n, _ in checkpoints.list_checkpoints(meta)] == [final - 5, final]
    assert not _temporaries(workdir)


def test_truncated_latest_checkpoint_is_skipped(reference_run, tmp_path, no_progress):
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
    train(tiny_config(**{**EVERY_5, "training.n_iters": N_ITERS}), workdir)
    assert "skipping unreadable checkpoint" in (workdir / "stdout.txt").read_text()
    _assert_same_weights(_meta_state(workdir, N_ITERS), _meta_state(reference_run, N_ITERS))


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


def test_resuming_with_another_model_is_a_one_line_error(tmp_path, no_progress):
    train(tiny_config(**{"training.n_iters": 5}), tmp_path)
    written = (tmp_path / "config.json").read_text()
    assert json.loads(written)["model"]["nf"] == 8

    with pytest.raises(checkpoints.CheckpointError) as err:
        train(tiny_config(**{"training.n_iters": 10, "model.nf": 16}), tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "new --workdir" in message
    assert "checkpoint_5.pth does not fit the model" in message and "another shape" in message

    result = run_cli(cli_args(tmp_path, **{"training.n_iters": 10, "model.nf": 16}))
    assert_one_line_error(result, f"to resume the run in {tmp_path}, use the config")
    # the record of the run's config is not overwritten by the config that does not fit
    assert (tmp_path / "config.json").read_text() == written


def test_load_module_state_names_the_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["0.weight"] = torch.zeros(5, 3)
    weights["9.bias"] = torch.zeros(2)
    del weights["1.bias"]
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_module_state(model, weights, "ckpt.pth")
    assert str(err.value) == (
        "ckpt.pth does not fit the model: 1 missing (1.bias); 1 unexpected (9.bias); "
        "1 of another shape (0.weight (5, 3) vs (4, 3) here)"
    )
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_generator_state_of_another_device_type_reseeds_deterministically(tmp_path, no_progress):
    # a CUDA generator's state (8 bytes of seed, 8 of offset) cannot be loaded into a CPU one
    gen = torch.Generator()
    cuda_like = torch.zeros(16, dtype=torch.uint8)
    assert not checkpoints.load_generator_state(gen, cuda_like, 123, "noise")
    assert torch.equal(
        torch.rand(5, generator=gen), torch.rand(5, generator=torch.manual_seed(123))
    )
    assert checkpoints.load_generator_state(gen, torch.Generator().get_state(), 123, "noise")

    # a run whose checkpoint holds such states resumes, warns, and resumes the same way twice
    short = {"training.n_iters": 5, "training.eval_freq": 1000}
    train(tiny_config(**short), tmp_path / "a")
    path = tmp_path / "a" / "checkpoints-meta" / "checkpoint_5.pth"
    state = checkpoints.load_checkpoint(path)
    state["random"]["data"] = state["random"]["noise"] = cuda_like
    checkpoints.save_atomic(state, path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    longer = {**short, "training.n_iters": 10}
    for run in ("a", "b"):
        train(tiny_config(**longer), tmp_path / run)
        log = (tmp_path / run / "stdout.txt").read_text()
        assert "the saved state of the data generator does not fit a cpu generator" in log
        assert "training finished at step 10" in log
    _assert_same_weights(_meta_state(tmp_path / "a", 10), _meta_state(tmp_path / "b", 10))


def test_leftovers_of_interrupted_writes_are_removed_on_start(tmp_path, no_progress):
    meta, snapshots = tmp_path / "checkpoints-meta", tmp_path / "checkpoints"
    for folder in (meta, snapshots):
        folder.mkdir()
    leftovers = [meta / ".checkpoint_15.pth.k2j4h1.tmp", snapshots / ".checkpoint_3.pth.x9.tmp"]
    others = [meta / ".notes.tmp", meta / "checkpoint_x.pth", snapshots / "README"]
    for path in leftovers + others:
        path.write_bytes(b"half")

    train(tiny_config(**{"training.n_iters": 5, "training.eval_freq": 1000}), tmp_path)
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in others)
    log = (tmp_path / "stdout.txt").read_text()
    assert log.count("left by a run killed while writing it") == 2
    assert checkpoints.remove_stale_temporaries(tmp_path / "nowhere") == []
