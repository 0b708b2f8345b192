"""Pictures: training curves (and, from the caption command, attention maps). Matplotlib's Agg backend only,
through ``matplotlib.figure.Figure`` so no GUI backend or pyplot global state is ever involved."""

from __future__ import annotations

import json
from pathlib import Path

from . import atomic


def _flat_safe(ax, values: list[float], min_span: float) -> None:
    """Y limits that span at least ``min_span``: a flat line stays flat instead of zooming into float noise."""
    lo, hi = min(values), max(values)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = 0.08 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def plot_curves(metrics_jsonl: str | Path, png: str | Path) -> Path:
    """Draw ``metrics.jsonl`` (one JSON object per epoch, as ``capcli train`` writes) to ``png``.

    Three panels, so no line hides another: the training loss per epoch (with its terms, the cross-entropy and
    the attention regulariser, when there is a regulariser; or the mean SCST reward); validation BLEU-4; and
    validation CIDEr, the scores in percent as the README and the papers give them. A score's axis spans at
    least 1 point (a flat line is drawn flat, not zoomed into rounding noise). The file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]

    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_bleu, ax_cider = fig.subplots(1, 3)
    ax_loss.plot(epochs, [r.get("train_loss") for r in rows], "o-", color="tab:blue", label="loss")
    terms = [("train_ce", "cross-entropy", "tab:purple"), ("train_reg", "attention regulariser", "tab:red"),
             ("train_reward", "mean reward (CIDEr-D)", "tab:olive")]
    shown = 1
    for key, label, colour in terms:
        if any(r.get(key) is not None and r.get(key) != r.get("train_loss") and r.get(key) != 0 for r in rows):
            ax_loss.plot(epochs, [r.get(key) for r in rows], "o--", color=colour, label=label)
            shown += 1
    if shown > 1:
        ax_loss.legend(loc="best")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")

    for ax, key, title, colour in ((ax_bleu, "val_BLEU-4", "validation BLEU-4", "tab:green"),
                                   (ax_cider, "val_CIDEr", "validation CIDEr", "tab:orange")):
        points = [(e, 100 * r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=colour)
            _flat_safe(ax, [v for _, v in points], min_span=1.0)
        ax.set(title=title, xlabel="epoch", ylabel="%")
    for ax in (ax_loss, ax_bleu, ax_cider):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()

    with atomic.atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(png)


# --- attention maps (capcli caption --attention-maps) ------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def attention_figure(image, words, alphas, grid: int | None = None, panel: int = 224, cols: int = 5,
                     opacity: float = 0.55, colormap: str = "jet"):
    """Where the model looked for each word: the photo, then one panel per word with its heat-map.

    ``alphas`` (L, N) holds one row of attention weights per word (N = grid * grid regions, row-major as the
    encoder's grid). Each row is reshaped to grid x grid, scaled to its own maximum, upsampled smoothly
    (bicubic) to the panel size, coloured and alpha-blended over the photo. Returns a PIL RGB image of
    ``ceil((L + 1) / cols)`` rows. Panels keep the photo's aspect ratio (its longest side is ``panel``): the
    encoder sees the photo squashed to a square, so its grid covers the whole photo and is stretched back over
    it. Drawn with Pillow (matplotlib only lends its colour map), which keeps
    one map per photo cheap enough for whole folders.
    """
    import math

    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    a = np.asarray(alphas, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] != len(words):
        raise ValueError(f"need one row of attention weights per word: {len(words)} words, alphas {a.shape}")
    g = grid or math.isqrt(a.shape[1])
    if g * g != a.shape[1]:
        raise ValueError(f"{a.shape[1]} attention weights do not form a {g} x {g} grid")
    lut = (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)  # (256, 3)
    w, h = image.size
    pw, ph = (panel, max(1, round(panel * h / w))) if w >= h else (max(1, round(panel * w / h)), panel)
    photo = image.convert("RGB").resize((pw, ph), Image.BICUBIC)
    base = np.asarray(photo, dtype=np.float32)
    title_h = max(14, panel // 10)
    font = _font(max(10, title_h - 6))
    n = len(words) + 1
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * pw, rows * (ph + title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (title, row) in enumerate([("(photo)", None), *zip(words, a, strict=True)]):
        x, y = (k % cols) * pw, (k // cols) * (ph + title_h)
        if row is None:
            tile = photo
        else:
            m = row.reshape(g, g)
            m = m / m.max() if m.max() > 0 else m
            up = np.asarray(Image.fromarray(m, mode="F").resize((pw, ph), Image.BICUBIC)).clip(0.0, 1.0)
            heat = lut[(up * 255).astype(np.uint8)].astype(np.float32)  # (ph, pw, 3)
            tile = Image.fromarray((base * (1 - opacity) + heat * opacity).astype(np.uint8))
        sheet.paste(tile, (x, y + title_h))
        draw.text((x + pw / 2, y + title_h / 2), title, fill="black", font=font, anchor="mm")
    return sheet


def save_attention_map(path: str | Path, image, words, alphas, grid: int | None = None, **kwargs) -> int:
    """Draw :func:`attention_figure` to the PNG ``path`` (atomically); returns the number of word panels."""
    sheet = attention_figure(image, words, alphas, grid=grid, **kwargs)
    with atomic.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=1)  # 4x faster than the default, ~10 % larger
    return len(words)
