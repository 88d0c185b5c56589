"""What runs leave for people: figures and JSON are written atomically (a failed write leaves the
old file and no temporary), and only by rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from scoreflow import distributed, records


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_image_write_leaves_the_old_png(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    images = np.full((4, 1, 8, 8), 200, dtype=np.uint8)
    records.save_image_grid(images, path)
    before = path.read_bytes()
    with Image.open(path) as image:
        assert image.size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))  # 2x2 tiles of 64 pixels

    def half_a_png(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_a_png)
    with pytest.raises(OSError, match="disk full"):
        records.save_image_grid(np.zeros((4, 1, 8, 8), dtype=np.uint8), path)
    assert path.read_bytes() == before and _only(tmp_path) == ["grid.png"]


def test_a_failed_curve_write_leaves_the_old_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "curve.png"
    records.save_curve({"loss": ([1, 2, 3], [3.0, 2.0, 1.0])}, path, "step", "loss")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def half_a_figure(self, fname, **kwargs):
        fname.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_a_figure)
    with pytest.raises(OSError, match="disk full"):
        records.save_curve({"loss": ([1, 2], [5.0, 4.0])}, path, "step", "loss")
    assert path.read_bytes() == before and _only(tmp_path) == ["curve.png"]


def test_save_json_replaces_atomically_and_only_on_rank_0(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    records.save_json({"model": {"nf": 8}}, path)
    assert json.loads(path.read_text()) == {"model": {"nf": 8}}
    with pytest.raises(TypeError):
        records.save_json({"model": object()}, path)  # fails before anything is written
    assert json.loads(path.read_text()) == {"model": {"nf": 8}} and _only(tmp_path) == [path.name]

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    records.save_json({"model": {"nf": 16}}, path)
    assert json.loads(path.read_text()) == {"model": {"nf": 8}}


def test_a_disabled_bar_leaves_no_thread_behind():
    """Ranks other than 0 and runs with SCOREFLOW_NO_PROGRESS get disabled bars; tqdm would
    start its monitor thread for them and keep it to the end of the process."""
    code = (
        "import threading\n"
        "from scoreflow import records\n"
        "bar = records.progress(range(3), desc='x')\n"
        "for _ in bar: pass\n"
        "bar.close()\n"
        "print(sorted(t.name for t in threading.enumerate()))\n"
    )
    env = dict(os.environ, SCOREFLOW_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "['MainThread']"
