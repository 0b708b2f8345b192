"""The review gallery: one self-contained page, a card per photo, least confident first; rendered by Chromium."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli.gallery import THUMB_PX, build_gallery, score, write_gallery

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def items() -> list[tuple[Path, dict]]:
    """Real captions of the example photos by the shipped model (top 3, grounded labels), plus one failed photo."""
    from capcli.captioner import DEFAULT_MODEL, Captioner

    if not DEFAULT_MODEL.is_file():
        pytest.skip("no shipped default model in capcli/assets")
    photos = sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".jpg", ".png"})
    recs = list(Captioner.load(device="cpu").caption_paths(photos, beam_size=3, top_k=3, workers=0))
    out = [(p, r | {"path": p.name}) for p, r in zip(photos, recs, strict=True)]
    out[0][1]["confidence"] = 0.97  # a record with a confidence sorts by it
    return out + [(EXAMPLES / "LICENSE.md", {"path": "LICENSE.md", "error": "LICENSE.md: not an image file"})]


class Cards(HTMLParser):
    """The cards of a page: their attributes, texts and image sources; and every URL the page refers to."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.urls: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "article" and "card" in (a.get("class") or "").split():
            self.cards.append({"attrs": a, "text": "", "img": None})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = a

    def handle_data(self, data):
        if self.cards:
            self.cards[-1]["text"] += data


@pytest.mark.slow
def test_one_card_per_photo_least_confident_first(items):
    page = build_gallery(items)
    cards = Cards(page).cards
    assert len(cards) == len(items)
    names = [c["attrs"]["data-name"] for c in cards]
    assert names[0] == "LICENSE.md" and "not an image file" in cards[0]["text"] and cards[0]["img"] is None
    scores = [float(c["attrs"]["data-score"]) for c in cards[1:]]
    assert scores == sorted(scores)
    by_name = {c["attrs"]["data-name"]: c for c in cards}
    for photo, rec in items[:-1]:
        card = by_name[photo.name]
        assert rec["caption"] in card["text"]
        for alt in rec["alternatives"][1:]:
            assert alt["caption"] in card["text"]
        for lab in rec.get("labels", []):
            assert lab["word"] in card["text"]
        s, kind = score(rec)
        assert kind in card["text"] and math.isclose(float(card["attrs"]["data-score"]), s, abs_tol=1e-6)
    assert score(items[0][1]) == (0.97, "confidence")


@pytest.mark.slow
def test_the_page_is_self_contained_with_small_thumbnails(items):
    page = build_gallery(items)
    parser = Cards(page)
    assert parser.urls and all(u.startswith("data:image/jpeg;base64,") for u in parser.urls)
    assert not re.search(r"https?://", page.replace("http://www.w3.org", ""))
    assert 'name="viewport"' in page
    imgs = [c["img"] for c in parser.cards if c["img"] is not None]
    assert len(imgs) == len(items) - 1  # all but the failed photo
    for img in imgs:
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert max(thumb.size) <= THUMB_PX and (int(img["width"]), int(img["height"])) == thumb.size
    assert len(page) < 60_000 * len(items)  # downscaled, not the photos themselves


def test_text_is_escaped(tmp_path):
    rec = {"path": "<b>x</b>.jpg", "caption": 'a "cat" <script>alert(1)</script>', "logprob": -3.0}
    page = build_gallery([(None, rec)])
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert len(Cards(page).cards) == 1


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_data}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@needs_chromium
@pytest.mark.slow
def test_the_gallery_renders_in_headless_chromium(items, tmp_path):
    page = write_gallery(tmp_path / "gallery.html", items)
    dom = _chromium("--dump-dom", page.as_uri(), user_data=tmp_path / "profile1").stdout
    assert len(Cards(dom).cards) == len(items)
    shot = tmp_path / "phone.png"
    _chromium("--window-size=390,844", f"--screenshot={shot}", page.as_uri(), user_data=tmp_path / "profile2")
    img = Image.open(shot).convert("RGB")
    assert img.size == (390, 844)
    a = np.asarray(img)
    # Not a blank or broken page: the photos' colours are there (thousands of distinct colours), text is dark.
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 2000
    assert (a.sum(axis=2) < 150).mean() > 0.002
