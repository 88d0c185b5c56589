"""What a run leaves for people to read: logs, progress bars, TensorBoard scalars, PNG figures.

Only rank 0 of a distributed job writes files or shows bars; the other ranks get silent
stand-ins, so the drivers call these helpers unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from scoreflow import checkpoints, distributed

__all__ = [
    "setup_logging",
    "progress",
    "ScalarWriter",
    "save_json",
    "save_image_grid",
    "save_curve",
]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to the console and, on rank 0, append to ``log_file`` (never truncated)."""
    root = logging.getLogger()
    root.setLevel(level if distributed.is_main() else logging.WARNING)
    for handler in list(root.handlers):
        if getattr(handler, "_scoreflow", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
    console._scoreflow = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None and distributed.is_main():
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a")
        file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        file_handler._scoreflow = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)


class _SilentBar(tqdm):
    """A disabled bar that starts no monitor thread: tqdm starts its monitor for disabled bars
    too and then never stops it, leaving a thread to the end of the process."""

    monitor_interval = 0


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 (disabled elsewhere, or when SCOREFLOW_NO_PROGRESS is set)."""
    disable = not distributed.is_main() or bool(os.environ.get("SCOREFLOW_NO_PROGRESS"))
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return (_SilentBar if disable else tqdm)(iterable, disable=disable, **kwargs)


class ScalarWriter:
    """TensorBoard scalars under ``folder`` on rank 0; a no-op on other ranks.

    ``purge_step``: the first step a resumed run logs (its checkpoint's step + 1). Events of
    earlier runs in ``folder`` at that step or later (logged after the checkpoint the run resumes
    from) are then hidden by TensorBoard, so that no step appears twice.
    """

    def __init__(self, folder: str | os.PathLike, purge_step: int | None = None):
        self._writer = None
        if distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(folder), purge_step=purge_step)

    def add(self, tag: str, value: float, step: int) -> None:
        """Record scalar ``value`` under ``tag`` at training step ``step``."""
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write the pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()


def save_json(value: Any, path: str | os.PathLike) -> Path:
    """Write ``value`` (plain dicts, lists, strings, numbers) as indented JSON to ``path``,
    atomically and on rank 0 only; returns the path."""
    path = Path(path)
    if distributed.is_main():
        text = json.dumps(value, indent=2) + "\n"
        checkpoints.write_atomic(path, lambda f: f.write(text.encode()))
    return path


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images ``(N, C, H, W)`` into one ``(H', W', C)`` array with a white border."""
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return grid


def save_image_grid(
    images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int = 0
) -> Path:
    """Write uint8 images ``(N, C, H, W)`` as one PNG grid (atomically); returns its path.

    Small images are enlarged: ``scale`` is the integer nearest-neighbour magnification (0 picks
    one that makes each image at least 64 pixels wide).
    """
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"save_image_grid wants uint8 images, got {images.dtype}")
    scale = scale or max(1, 64 // images.shape[-1])
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    grid = image_grid(images, nrow=nrow)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    image = Image.fromarray(grid)
    return checkpoints.write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_curve(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> Path:
    """Plot named ``(x, y)`` series as lines in one PNG at ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name, marker="o" if len(xs) < 20 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return checkpoints.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
