"""Checkpoint files: atomic writes, loads that execute no pickled code, latest-good discovery.

A checkpoint is a dict of tensors, numbers, strings and nested dicts/lists of those, written with
``torch.save`` to a temporary file in the target folder, flushed to disk, then renamed over the
final name, so that a crash leaves either the old file or the new one, never half of one. Loading
uses ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

Two folders are used by the training drivers:

- ``checkpoints/checkpoint_<k>.pth``: snapshot number k (k = step // snapshot_freq), kept forever;
- ``checkpoints-meta/checkpoint_<step>.pth``: pre-emption checkpoints, of which the newest few are
  kept; a restarted run resumes from the newest one that loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "save_atomic",
    "savez_atomic",
    "write_atomic",
    "load_checkpoint",
    "list_checkpoints",
    "load_latest",
    "prune",
    "remove_stale_temporaries",
    "file_digest",
    "load_module_state",
    "load_training_state",
    "restore_ema_weights",
    "load_generator_state",
]

_NUMBERED = re.compile(r"^checkpoint_(\d+)\.pth$")
# the temporary file of write_atomic(".../checkpoint_<n>.pth"): ".checkpoint_<n>.pth.<random>.tmp"
_TEMPORARY = re.compile(r"^\.checkpoint_\d+\.pth\..+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong layout."""


def _default_mode() -> int:
    """The permission bits an ordinary ``open(path, "w")`` would give (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` atomically: ``write`` fills a temporary file in the same folder,
    which is flushed to disk and renamed over ``path``. A reader sees the old file or the new
    one, never a partial one; on any error the old file is left as it was. The file gets the
    permissions of an ordinary new file (not the private 0o600 of a temporary one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` of ``state`` to ``path``, atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(state, f))


def savez_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez`` of ``arrays`` to ``path``, atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code.

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable or holds
    anything but tensors and plain Python containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {first}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return state


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(number, path)`` of every ``checkpoint_<number>.pth`` in ``folder``, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NUMBERED.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def load_latest(
    folder: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint of ``folder`` that loads, with its path; None if there is none.

    A newer file that fails to load (truncated, corrupt) is reported with a warning and skipped
    in favour of the previous one; it is left on disk for inspection.
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    return None


def prune(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest numbered checkpoints of ``folder``."""
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`write_atomic` leaves when its process is killed
    while writing a numbered checkpoint of ``folder`` (``.checkpoint_<n>.pth.<random>.tmp``).

    Call it only when no other process writes to ``folder`` (a driver starting up, on rank 0).
    Returns the paths removed; other files are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(entry for entry in folder.iterdir() if _TEMPORARY.match(entry.name))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes, as a hex string: the identity of a checkpoint's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_module_state(module: torch.nn.Module, weights: dict[str, Any], source: str) -> None:
    """``module.load_state_dict(weights, strict=True)``, with every mismatch reported in one line.

    Missing and unexpected keys and tensors of another shape raise :class:`CheckpointError`,
    whose message starts with ``source`` (e.g. the checkpoint's path) and names the first few
    offending keys with both shapes; the module is then left unchanged.
    """
    own = module.state_dict()
    problems = []
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    reshaped = [
        f"{key} {tuple(weights[key].shape)} vs {tuple(own[key].shape)} here"
        for key in own
        if key in weights
        and isinstance(weights[key], torch.Tensor)
        and weights[key].shape != own[key].shape
    ]
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", reshaped),
    ):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(weights, strict=True)


def load_training_state(
    state: dict[str, Any],
    path: str | os.PathLike,
    model: torch.nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    hint: str,
) -> None:
    """Load the ``"model"``, ``"ema"`` and ``"optimizer"`` entries of the training checkpoint
    ``state`` (read from ``path``) into a driver's model, EMA and optimiser.

    A checkpoint of another model (a run started with another config) raises a one-line
    :class:`CheckpointError` that names ``path``, the first mismatches, and then ``hint`` (what
    the user can do about it).
    """
    try:
        load_module_state(model, state["model"], str(path))
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {hint}") from err
    except (KeyError, RuntimeError, ValueError) as err:
        reason = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
        reason = reason.splitlines()[0] if reason else type(err).__name__
        raise CheckpointError(f"{path} does not fit the model ({reason}); {hint}") from err


def restore_ema_weights(
    model: torch.nn.Module, state: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Load a training checkpoint's weights into ``model``, with the EMA average as parameters.

    ``state`` is a loaded checkpoint with ``"model"`` (a full state dict, buffers included) and
    ``"ema"`` (parameter name -> averaged tensor, as written by :class:`scoreflow.ema.EMA`).
    Key and shape mismatches raise :class:`CheckpointError` naming ``source`` (e.g. the path)
    and the keys.
    """
    if "model" not in state or "ema" not in state:
        raise CheckpointError(f"{source} lacks the 'model' or 'ema' entry of a training state")
    weights = dict(state["model"])
    ema = {k: v for k, v in state["ema"].items() if not k.startswith("__")}
    unknown = sorted(set(ema) - set(weights))
    if unknown:
        raise CheckpointError(f"{source} has EMA entries without a model parameter: {unknown[:5]}")
    weights.update(ema)
    load_module_state(model, weights, source)


def load_generator_state(
    generator: torch.Generator, state: torch.Tensor, fallback_seed: int, name: str
) -> bool:
    """Give ``generator`` the saved ``state``, or, when that state does not fit it, the seed
    ``fallback_seed``; returns whether the saved state was used.

    A generator's state is specific to its device type (a CUDA generator's is 16 bytes of seed
    and offset, a CPU one's the 5056-byte Mersenne Twister), so a run resumed on another kind of
    device cannot continue the saved stream; it continues with a fresh, deterministic one
    instead, and a warning naming the generator ``name`` says so.
    """
    try:
        generator.set_state(state)
        return True
    except (RuntimeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning(
            "the saved state of the %s generator does not fit a %s generator (%s): reseeded it "
            "deterministically, so the resumed run is not bit-exact",
            name,
            generator.device.type,
            first,
        )
        generator.manual_seed(fallback_seed)
        return False
