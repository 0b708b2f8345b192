"""The CIDEr-D reward of self-critical training equals pycocoevalcap's CIDEr-D on the same corpus."""

from __future__ import annotations

import json

import pytest
from pycocoevalcap.cider.cider import Cider

from capcli.cider import CiderD
from capcli.vocab import tokenize


def _compare(refs: dict[int, list[str]], cands: dict[int, str]) -> None:
    gts = {i: [" ".join(tokenize(c)) for c in rs] for i, rs in refs.items()}
    res = {i: [" ".join(tokenize(c))] for i, c in cands.items()}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD({i: [g.split() for g in gs] for i, gs in gts.items()})
    mine = [ours.score(i, res[i][0].split()) for i in sorted(gts)]
    assert mine == pytest.approx(list(per_image), abs=1e-9)
    assert sum(mine) / len(mine) == pytest.approx(mean, abs=1e-9)


def test_matches_the_toolkit_on_a_small_corpus():
    refs = {1: ["a dog runs on the grass", "a brown dog is running", "the dog plays outside"],
            2: ["two men ride bikes", "men riding bicycles on a road", "two cyclists on the street"],
            3: ["a girl in a pink dress", "a little girl is smiling", "a child wearing pink"]}
    cands = {1: "a brown dog runs on the grass", 2: "a girl rides a bike", 3: "a little girl in pink"}
    _compare(refs, cands)
    ours = CiderD({i: [tokenize(c) for c in rs] for i, rs in refs.items()})
    assert ours.score(1, tokenize(refs[1][0])) > ours.score(1, tokenize("two men ride bikes")) == 0.0


def test_matches_the_toolkit_on_flickr8k(flickr8k_dir):
    """300 real images: each image's first caption scored against its other four."""
    caps = json.loads((flickr8k_dir / "captions.json").read_text())["annotations"]
    refs: dict[int, list[str]] = {}
    for a in caps:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    ids = sorted(refs)[:300]
    _compare({i: refs[i][1:] for i in ids}, {i: refs[i][0] for i in ids})
