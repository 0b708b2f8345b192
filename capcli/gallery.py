"""A review gallery: one self-contained HTML page with a card per photo, the least confident first.

Each card has a downscaled thumbnail (a JPEG data URI: the page needs no other file and loads nothing from the
network; a Content-Security-Policy says so), the caption, its alternatives, the grounding labels and a score. The
score is the record's ``confidence`` when it has one, else the caption's per-word probability,
``exp(logprob / (words + 1))`` (the +1 is the end token the log-probability includes). Photos that failed come first.
A small inline script re-sorts the cards (least / most confident first, by name); without it the page is already in
the least-confident-first order. The layout is a single column on a phone and a grid on wider screens.

The page carries capcli's generator mark (:data:`GENERATOR`, also in ``capcli evaluate``'s report): an ``--html``
target that already exists is replaced only when it holds the mark (or is empty), so a rerun replaces its own page
but never a photo, an output or another file (:func:`check_target`).
"""

from __future__ import annotations

import contextlib
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .errors import ImageError, UsageError
from .images import thumbnail_data_uri
from .names import display

THUMB_PX = 320  # longest side of a thumbnail, in pixels
GENERATOR = '<meta name="generator" content="capcli">'  # in the <head> of every page capcli writes
_MARK_WITHIN = 4096  # bytes: the mark comes before the page's style sheet


def is_capcli_page(path: Path) -> bool:
    """Whether ``path`` is a regular file holding capcli's generator mark near its start, or an empty file."""
    try:
        with path.open("rb") as f:
            head = f.read(_MARK_WITHIN)
    except OSError:
        return False
    return not head or GENERATOR.encode() in head


def check_target(path: str | Path, protected: dict[Path, str], option: str = "--html") -> None:
    """Refuse, before any work, an HTML target that cannot be written or would replace what it must not
    (:class:`UsageError`): a folder or a path under a file, one of ``protected`` (path -> what it is, e.g. "the
    output file (-o)"), or an existing file that is not a page capcli wrote (a photo, a caption file, a person's
    page)."""
    path = Path(path)
    name = f"{option} {display(str(path))}"
    if path.is_dir():
        raise UsageError(f"{name}: it is a folder; give a file name")
    above = next((p for p in path.parents if p.exists()), None)  # the nearest part of the path that exists
    if above is not None and not above.is_dir():
        raise UsageError(f"{name}: cannot make its folder ({display(str(above))} is a file)")
    where = path.resolve()
    for other, what in protected.items():
        if Path(other).resolve() == where:
            raise UsageError(f"{name} is {what}; give the page another name")
    if path.exists() and not (path.is_file() and is_capcli_page(path)):
        raise UsageError(f"{name}: that file exists and is not a page capcli wrote; give another name (or remove "
                         "the file)")


@dataclass(frozen=True)
class Card:
    """What one photo's card shows."""

    key: str  # the record's path
    caption: str = ""
    error: str = ""
    score: float | None = None  # 0..1; None for a photo that failed
    score_kind: str = ""  # "confidence" or "p/word"
    logprob: float | None = None
    alternatives: tuple[tuple[str, float | None], ...] = ()
    labels: tuple[tuple[str, float], ...] = ()
    thumb: str = ""  # data URI, "" when the photo could not be read
    size: tuple[int, int] = (0, 0)  # thumbnail width, height
    notes: tuple[str, ...] = ()  # what publishing did instead: held back, a person's words kept


def score(record: dict[str, Any]) -> tuple[float | None, str]:
    """The card's score and its kind: the record's confidence, else the caption's per-word probability."""
    if record.get("confidence") is not None:
        return float(record["confidence"]), "confidence"
    if record.get("logprob") is not None and record.get("caption"):
        words = len(str(record["caption"]).split())
        return math.exp(float(record["logprob"]) / (words + 1)), "p/word"
    return None, ""


def make_card(photo: Path | None, record: dict[str, Any], thumb_px: int = THUMB_PX,
              notes: Sequence[str] = ()) -> Card:
    """A card for one record; a photo that cannot be read gets a card without a thumbnail."""
    thumb, size = "", (0, 0)
    if photo is not None:
        with contextlib.suppress(ImageError):
            thumb, size = thumbnail_data_uri(photo, thumb_px, quality=78)
    s, kind = score(record) if not record.get("error") else (None, "")
    alts = tuple((str(a.get("caption", "")), a.get("logprob")) for a in record.get("alternatives") or [])
    labels = tuple((str(lab["word"]), float(lab.get("p", 0.0))) for lab in record.get("labels") or [])
    return Card(key=str(record.get("path", photo.name if photo else "?")), caption=str(record.get("caption") or ""),
                error=str(record.get("error") or ""), score=s, score_kind=kind, logprob=record.get("logprob"),
                alternatives=alts, labels=labels, thumb=thumb, size=size, notes=tuple(notes))


def order(cards: Sequence[Card]) -> list[Card]:
    """Failed photos first, then the least confident; ties by name."""
    return sorted(cards, key=lambda c: (c.score is not None, c.score if c.score is not None else 0.0, c.key))


def _card_html(card: Card) -> str:
    e = html.escape
    img = (f'<img src="{card.thumb}" width="{card.size[0]}" height="{card.size[1]}" alt="{e(card.caption)}">'
           if card.thumb else '<div class="noimg">no preview</div>')
    body = [f'<h2 class="name">{e(card.key)}</h2>']
    if card.error:
        body.append(f'<p class="error">{e(card.error)}</p>')
    else:
        body.append(f'<p class="caption">{e(card.caption)}</p>')
    body += [f'<p class="note">{e(n)}</p>' for n in card.notes]
    if card.score is not None:
        pct = round(100 * card.score)
        lp = f" · logprob {card.logprob:.2f}" if card.logprob is not None else ""
        body.append(f'<div class="meter" role="meter" aria-valuenow="{pct}" aria-valuemin="0" aria-valuemax="100">'
                    f'<span style="width:{pct}%"></span></div>'
                    f'<p class="score">{e(card.score_kind)} {card.score:.2f}{lp}</p>')
    if card.labels:
        chips = "".join(f'<li>{e(w)} <small>{p:.2f}</small></li>' for w, p in card.labels)
        body.append(f'<ul class="labels">{chips}</ul>')
    alts = [(c, lp) for c, lp in card.alternatives if c != card.caption]
    if alts:
        items = "".join(f"<li>{e(c)}" + (f" <small>{lp:.2f}</small>" if lp is not None else "") + "</li>"
                        for c, lp in alts)
        body.append(f'<details><summary>{len(alts)} alternative{"s" * (len(alts) > 1)}</summary>'
                    f'<ol class="alts">{items}</ol></details>')
    key = card.score if card.score is not None else -1.0
    return (f'<article class="card" data-score="{key:.6f}" data-name="{e(card.key)}">{img}'
            f'<div class="body">{"".join(body)}</div></article>')


_CSS = """
:root{color-scheme:light dark;--bg:#f4f4f2;--fg:#1b1b1b;--card:#fff;--muted:#666;--accent:#2f6fd0;--bad:#c0392b}
@media (prefers-color-scheme:dark){:root{--bg:#161616;--fg:#eee;--card:#242424;--muted:#aaa;--accent:#6ea2ff}}
*{box-sizing:border-box}body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--fg)}header{padding:12px 16px;display:flex;flex-wrap:wrap;gap:8px 16px;
align-items:center}h1{font-size:1.25rem;margin:0}header p{margin:0;color:var(--muted)}
select{font:inherit;padding:4px 8px}
#cards{display:grid;gap:12px;align-items:start;padding:0 12px 24px;
grid-template-columns:repeat(auto-fill,minmax(min(100%,17rem),1fr))}
.card{background:var(--card);border-radius:10px;overflow:hidden;box-shadow:0 1px 3px #0003;display:flex;
flex-direction:column}.card img{display:block;width:100%;height:auto;aspect-ratio:4/3;object-fit:contain;
background:#8881}.noimg{aspect-ratio:4/3;display:grid;place-items:center;color:var(--muted);background:#8881}
.body{padding:10px 12px 12px}
.name{font-size:.85rem;font-weight:500;margin:0 0 4px;color:var(--muted);overflow-wrap:anywhere}
.caption{font-size:1.05rem;font-weight:600;margin:0 0 8px}.error{color:var(--bad);margin:0 0 8px}
.note{color:var(--bad);font-size:.85rem;margin:0 0 6px}
.meter{height:6px;border-radius:3px;background:#8883;overflow:hidden}.meter span{display:block;height:100%;
background:var(--accent)}.score{font-size:.85rem;color:var(--muted);margin:4px 0 6px}
.labels{list-style:none;padding:0;margin:0 0 6px;display:flex;flex-wrap:wrap;gap:4px}.labels li{font-size:.8rem;
padding:1px 8px;border-radius:10px;background:#8882}details{font-size:.9rem}.alts{margin:4px 0 0;padding-left:20px}
small{color:var(--muted)}
"""

_JS = """
document.getElementById('sort').addEventListener('change', function (ev) {
  var box = document.getElementById('cards'), cards = Array.prototype.slice.call(box.children), how = ev.target.value;
  cards.sort(function (a, b) {
    if (how === 'name') return a.dataset.name.localeCompare(b.dataset.name);
    var d = parseFloat(a.dataset.score) - parseFloat(b.dataset.score);
    return (how === 'most' ? -d : d) || a.dataset.name.localeCompare(b.dataset.name);
  });
  cards.forEach(function (c) { box.appendChild(c); });
});
"""


def render(cards: Sequence[Card], title: str = "capcli captions") -> str:
    """The whole page for these cards, in :func:`order`."""
    e = html.escape
    failed = sum(1 for c in cards if c.error)
    summary = f"{len(cards)} photo{'s' * (len(cards) != 1)}" + (f", {failed} failed" if failed else "")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return "\n".join([
        "<!doctype html>", f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1><p>{e(summary)}</p>",
        '<label>Sort <select id="sort"><option value="least">least confident first</option>'
        '<option value="most">most confident first</option><option value="name">by name</option></select></label>',
        "</header>", '<main id="cards">', *(_card_html(c) for c in order(cards)), "</main>",
        f"<script>{_JS}</script></body></html>", ""])


def build_gallery(items: Sequence[tuple[Path | None, dict[str, Any]]], title: str = "capcli captions",
                  thumb_px: int = THUMB_PX, notes: Mapping[Path, Sequence[str]] | None = None) -> str:
    """The page for ``(photo path, record)`` pairs (records as ``capcli caption`` writes them); ``notes``: what
    publishing said of a photo (held back, a person's words kept), shown on its card."""
    notes = notes or {}
    return render([make_card(photo, rec, thumb_px, notes.get(photo, ()) if photo is not None else ())
                   for photo, rec in items], title)


def write_gallery(out: str | Path, items: Sequence[tuple[Path | None, dict[str, Any]]],
                  title: str = "capcli captions", thumb_px: int = THUMB_PX,
                  notes: Mapping[Path, Sequence[str]] | None = None) -> Path:
    """Write :func:`build_gallery`'s page to ``out`` atomically."""
    return atomic.write_text(out, build_gallery(items, title, thumb_px, notes))
