"""Training curves: a flat score stays flat (no axis zoomed into rounding noise), one panel per metric."""

from __future__ import annotations

import json

from matplotlib.figure import Figure
from PIL import Image

from capcli.viz import _flat_safe, plot_curves


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
