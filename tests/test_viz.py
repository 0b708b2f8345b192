"""Training curves: a flat score stays flat (no axis zoomed into rounding noise), one panel per metric; attention
maps under long names."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from capcli.viz import _flat_safe, plot_curves, save_attention_map


def test_a_flat_line_gets_an_axis_of_at_least_one_point():
    ax = Figure().subplots()
    ax.plot([1, 2, 3], [1.2, 1.2 + 1e-14, 1.2])
    _flat_safe(ax, [1.2, 1.2 + 1e-14, 1.2], min_span=1.0)
    lo, hi = ax.get_ylim()
    assert hi - lo >= 1.0 and lo < 1.2 < hi
    ax2 = Figure().subplots()
    _flat_safe(ax2, [5.0, 9.0], min_span=1.0)  # a real change keeps its own range
    lo, hi = ax2.get_ylim()
    assert 4 < lo < 5 and 9 < hi < 10


def test_curves_have_a_panel_per_metric(tmp_path):
    rows = [{"epoch": e, "train_loss": 33.5 - e, "train_ce": 4.5 - e / 10, "train_reg": 29 - 0.9 * e,
             "val_BLEU-4": 0.012, "val_CIDEr": 0.05 + e / 100} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert Image.open(png).size == (1300, 400)


def test_an_attention_map_is_written_under_a_long_name_or_fails_with_the_reason(tmp_path):
    """A map is named after its photo plus ``.png``; its temporary name, longer still, must fit too."""
    photo = Image.open(Path(__file__).resolve().parent.parent / "examples" / "photos" / "chelsea.jpg")
    words, alphas = ["a", "cat"], np.random.default_rng(0).random((2, 49))
    for name in ("写真" * 40 + ".jpg.png", os.fsdecode(b"cat\xff.jpg.png")):  # 248 bytes; not UTF-8
        assert save_attention_map(tmp_path / name, photo, words, alphas, grid=7) == 2
        assert Image.open(tmp_path / name).size == (3 * 224, 149 + 22)  # the photo, a panel per word
    too_long = "写真" * 42 + ".jpg.png"  # 260 bytes
    with pytest.raises(OSError, match=r"File name too long \(260 bytes; at most 255 here\)") as e:
        save_attention_map(tmp_path / too_long, photo, words, alphas, grid=7)
    assert e.value.errno == errno.ENAMETOOLONG
    assert len(os.listdir(tmp_path)) == 2  # no temporary left
