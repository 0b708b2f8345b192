"""Pictures: training curves (and, from the caption command, attention maps). Matplotlib's Agg backend only,
through ``matplotlib.figure.Figure`` so no GUI backend or pyplot global state is ever involved."""

from __future__ import annotations

import json
from pathlib import Path

from . import atomic


def plot_curves(metrics_jsonl: str | Path, png: str | Path) -> Path:
    """Draw ``metrics.jsonl`` (one JSON object per epoch, as ``capcli train`` writes) to ``png``.

    Left: training loss per epoch (and the cross-entropy alone, when it differs). Right: validation
    BLEU-4 and CIDEr per epoch (CIDEr on its own axis, as it runs on a larger scale). The file is
    written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    epochs = [r["epoch"] for r in rows]

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_bleu = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r.get("train_loss") for r in rows], "o-", color="tab:blue", label="loss")
    if any(r.get("train_ce") is not None and r.get("train_ce") != r.get("train_loss") for r in rows):
        # attention models: the loss adds the doubly stochastic regulariser; show the cross-entropy alone too
        ax_loss.plot(epochs, [r.get("train_ce") for r in rows], "o--", color="tab:purple", label="cross-entropy")
        ax_loss.legend(loc="best")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_loss.grid(alpha=0.3)

    bleu = [(e, r["val_BLEU-4"]) for e, r in zip(epochs, rows, strict=True) if r.get("val_BLEU-4") is not None]
    cider = [(e, r["val_CIDEr"]) for e, r in zip(epochs, rows, strict=True) if r.get("val_CIDEr") is not None]
    lines = []
    if bleu:
        lines += ax_bleu.plot(*zip(*bleu, strict=True), "o-", color="tab:green", label="BLEU-4")
    ax_bleu.set(title="validation", xlabel="epoch", ylabel="BLEU-4")
    ax_bleu.grid(alpha=0.3)
    if cider:
        ax_cider = ax_bleu.twinx()
        lines += ax_cider.plot(*zip(*cider, strict=True), "s-", color="tab:orange", label="CIDEr")
        ax_cider.set_ylabel("CIDEr")
    if lines:
        ax_bleu.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    for ax in (ax_loss, ax_bleu):
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
    ``ceil((L + 1) / cols)`` rows; drawn with Pillow (matplotlib only lends its colour map), which keeps
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
    photo = image.convert("RGB").resize((panel, panel), Image.BICUBIC)
    base = np.asarray(photo, dtype=np.float32)
    title_h = max(14, panel // 10)
    font = _font(max(10, title_h - 6))
    n = len(words) + 1
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * panel, rows * (panel + title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (title, row) in enumerate([("(photo)", None), *zip(words, a, strict=True)]):
        x, y = (k % cols) * panel, (k // cols) * (panel + title_h)
        if row is None:
            tile = photo
        else:
            m = row.reshape(g, g)
            m = m / m.max() if m.max() > 0 else m
            up = np.asarray(Image.fromarray(m, mode="F").resize((panel, panel), Image.BICUBIC)).clip(0.0, 1.0)
            heat = lut[(up * 255).astype(np.uint8)].astype(np.float32)  # (panel, panel, 3)
            tile = Image.fromarray((base * (1 - opacity) + heat * opacity).astype(np.uint8))
        sheet.paste(tile, (x, y + title_h))
        draw.text((x + panel / 2, y + title_h / 2), title, fill="black", font=font, anchor="mm")
    return sheet


def save_attention_map(path: str | Path, image, words, alphas, grid: int | None = None, **kwargs) -> int:
    """Draw :func:`attention_figure` to the PNG ``path`` (atomically); returns the number of word panels."""
    sheet = attention_figure(image, words, alphas, grid=grid, **kwargs)
    with atomic.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=1)  # 4x faster than the default, ~10 % larger
    return len(words)
