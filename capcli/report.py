"""The HTML report of ``capcli evaluate``: one self-contained page, per image its thumbnail, caption, references
and scores, worst first, with CHAIR's object badges (hallucinated objects in red)."""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping
from pathlib import Path

from . import atomic
from .chair import ChairScores
from .errors import CapcliError
from .gallery import GENERATOR
from .images import thumbnail_data_uri
from .layout import Dataset
from .progress import NULL, Progress
from .scoring import METRIC_KEYS, Scores

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.m td,table.m th{padding:.2em .8em;text-align:left}
table.r{border-collapse:collapse;width:100%}
table.r td{border-top:1px solid #ddd;padding:.5em;vertical-align:top}
td.img img{display:block;max-width:160px}
.cap{font-size:1.1em;font-weight:600}
ul.refs{margin:.3em 0;padding-left:1.2em;color:#555}
.score{font-variant-numeric:tabular-nums;white-space:nowrap}
.approx{color:#a60}
.nav a,.nav button{margin-right:1em}
.obj{display:inline-block;border-radius:.6em;padding:0 .5em;margin:.2em .3em 0 0;font-size:.85em;background:#e8eef4}
.obj.hal{background:#c62828;color:#fff;font-weight:600}
"""

_JS = """
function flipOrder(){var b=document.getElementById('rows');var r=Array.prototype.slice.call(b.rows).reverse();
for(var i=0;i<r.length;i++){b.appendChild(r[i]);}
var t=document.getElementById('order');t.textContent=t.textContent.indexOf('worst')==0?
'best first':'worst first';}
"""


def write_html(
    path: str | Path,
    dataset: Dataset,
    results: Mapping[int, str],
    scores: Scores,
    split: str,
    title: str = "capcli evaluation",
    progress: Progress = NULL,
    thumb_size: int = 160,
) -> Path:
    """A self-contained HTML report: per image its thumbnail, caption, references and CIDEr, and with
    ``scores.chair`` the caption's COCO objects as badges (hallucinated ones in red) and CHAIR_s / CHAIR_i.

    Rows are sorted worst to best CIDEr; links jump to either end and a button flips the order.
    Thumbnails are embedded as base64 JPEGs; the page loads nothing from elsewhere.
    """
    esc = functools.partial(html.escape, quote=True)
    key = "CIDEr" if "CIDEr" in scores.values else next(iter(scores.values), None)

    def per(i: int, k: str | None) -> float:
        return scores.per_image.get(i, {}).get(k, float("nan")) if k else float("nan")

    ids = sorted(results, key=lambda i: (per(i, key), i))
    rows: list[str] = []
    progress.start("report thumbnails", total=len(ids))
    try:
        for rank, i in enumerate(ids, 1):
            rec = dataset.get(i)
            try:
                img = f'<img alt="image {i}" src="{thumbnail_data_uri(dataset.path(rec), thumb_size)[0]}">'
            except CapcliError as e:
                img = f'<span class="approx">image unavailable: {esc(str(e))}</span>'
            refs = "".join(f"<li>{esc(c)}</li>" for c in rec.captions)
            anchor = ' id="worst"' if rank == 1 else (' id="best"' if rank == len(ids) else "")
            detail = " ".join(
                f"{k} {100 * per(i, k):.1f}" for k in ("BLEU-4", "METEOR", "ROUGE-L")
                if k in scores.per_image.get(i, {})
            )
            rows.append(
                f'<tr{anchor} data-id="{i}"><td class="score">#{rank}</td><td class="img">{img}</td>'
                f'<td><div class="cap">{esc(results[i])}</div>{_chair_badges(scores.chair, i)}'
                f'<ul class="refs">{refs}</ul>'
                f'<div class="score">image {i} · {esc(rec.file)}</div></td>'
                f'<td class="score"><b>{esc(str(key))} {100 * per(i, key):.1f}</b><br>{esc(detail)}</td></tr>'
            )
            progress.advance(1)
    finally:
        progress.done()
    metric_rows = "".join(
        f"<tr><th>{esc(k)}</th><td class=\"score\">{100 * scores.values[k]:.1f}</td>"
        f"<td>{'official' if scores.official.get(k) else '<span class=approx>approximate</span>'}</td></tr>"
        for k in METRIC_KEYS
        if k in scores.values
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in scores.notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{esc(title)}</title><style>{_CSS}</style></head>
<body><h1>{esc(title)}</h1>
<p>Dataset {esc(dataset.name)}, split {esc(split)}, {len(ids)} images; scores in percent, as the terminal shows
them (the metrics JSON keeps the toolkit's fractions).</p>
<table class="m">{metric_rows}{_chair_rows(scores.chair)}</table>
{f'<ul class="notes">{notes}</ul>' if notes else ''}
<p class="nav"><a href="#worst">worst</a><a href="#best">best</a>
<button type="button" onclick="flipOrder()">flip order</button> showing <span id="order">worst first</span>
(per-image {esc(str(key))})</p>
<table class="r"><tbody id="rows">
{chr(10).join(rows)}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""
    return atomic.write_text(path, page)


# ---- CHAIR in the HTML report ---------------------------------------------------------------------
def _chair_rows(chair: ChairScores | None) -> str:
    """Summary rows for the report's metric table (empty without CHAIR)."""
    if chair is None:
        return ""
    ci = f"{chair.chair_i:.1f}%" if chair.chair_i is not None else "-"
    top = ", ".join(f"{c} {n}" for c, n in chair.top_hallucinated)
    how = (f"{chair.captions_hallucinating} of {chair.captions} captions, {chair.hallucinated} of "
           f"{chair.mentioned} objects mentioned; most often: {top or 'none'}")
    return (f'<tr><th>CHAIR_s</th><td class="score">{chair.chair_s:.1f}%</td><td>lower is better</td></tr>'
            f'<tr><th>CHAIR_i</th><td class="score">{ci}</td><td>hallucinated objects: {html.escape(how)}</td></tr>')


def _chair_badges(chair: ChairScores | None, image_id: int) -> str:
    """The caption's COCO objects as badges, hallucinated ones (not named by any reference) in red."""
    one = chair.per_image.get(image_id) if chair is not None else None
    if one is None or not one.mentioned:
        return ""
    bad = set(one.hallucinated)
    return "<div>" + "".join(
        f'<span class="obj hal" title="not in any reference">{html.escape(o)}</span>' if o in bad
        else f'<span class="obj">{html.escape(o)}</span>'
        for o in one.mentioned
    ) + "</div>"
