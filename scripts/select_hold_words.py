"""Choose the words grounding holds back without evidence (``GroundingPolicy.hold_words``), on Flickr8k val.

Captions the val photos with the shipped model, grounding off, and reads each photo's ImageNet evidence per table
word (capcli/grounding.py). A table word is held back when its evidence is low if either:

- the evidence never misses it: at least 5 photos' references name it, and at most 5% of those have evidence
  below 0.01 (dog: 0 of 244);
- the decoder says it out of habit: it is one of the 80 COCO objects (capcli/chair.py), the plain captions name it
  at least twice with evidence below 0.1, and two times in three or more no reference of the photo names it
  (bench: 26 of 29).

    CAPCLI_HOME=... python scripts/select_hold_words.py [--data flickr8k]

prints both lists and the counts behind them. coco-mini is never read.
"""

from __future__ import annotations

import argparse

import torch

from capcli.captioner import DEFAULT_MODEL, Captioner
from capcli.chair import chair, objects_in
from capcli.evaluate import open_dataset
from capcli.grounding import Grounder
from capcli.vocab import tokenize

MIN_PHOTOS, MISS_EVIDENCE, MAX_MISSED = 5, 0.01, 0.05
HABIT_EVIDENCE, MIN_HABIT, HABIT_SHARE = 0.1, 2, 2 / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="flickr8k", help="a prepared dataset (name or folder) with a val split")
    args = ap.parse_args()
    ds = open_dataset(args.data)
    val = ds.split("val")
    plain = Captioner.load(DEFAULT_MODEL, device="cpu", precision="float32", grounding="off")
    g = Grounder.for_model(plain.vocab)
    logits, captions = [], {}
    with torch.inference_mode():  # each photo read and encoded once: its ImageNet logits and its plain caption
        for s in range(0, len(val), 64):
            batch = val[s: s + 64]
            grid = plain.encoder(torch.stack([plain.spec.read(ds.path(r)) for r in batch]))  # (B, N, D)
            logits.append(plain.encoder.imagenet_logits(grid))
            recs = plain._decode(plain.model.features_of_kind(grid, plain.model.feature_kind), None,
                                 plain.search_options(beam_size=3), return_alphas=False)
            captions.update({r.id: rec["caption"] for r, rec in zip(batch, recs, strict=True)})
    ev = g.evidence(torch.cat(logits)).words  # (n, W)
    refs = {r.id: list(r.captions) for r in val}
    scores = chair(captions, refs)
    ref_words = [set().union(*(tokenize(c) for c in r.captions)) for r in val]  # per photo, tokenised once
    said_words = [set(captions[r.id].split()) for r in val]
    never_misses, habits = [], []
    for w in g.words:
        if w in g.alias:
            continue
        forms, e = set(g.table.words[w].forms), ev[:, g.index[w]]
        named = [i for i, words in enumerate(ref_words) if forms & words]
        missed = sum(float(e[i]) < MISS_EVIDENCE for i in named)
        if len(named) >= MIN_PHOTOS and missed <= MAX_MISSED * len(named):
            never_misses.append((w, missed, len(named)))
        objects = objects_in(w)
        said = [i for i, words in enumerate(said_words) if forms & words and e[i] < HABIT_EVIDENCE]
        wrong = [i for i in said if objects & set(scores.per_image[val[i].id].hallucinated)]
        if objects and len(wrong) >= MIN_HABIT and len(wrong) >= HABIT_SHARE * len(said):
            habits.append((w, len(wrong), len(said)))
    print("never missed (word, photos with evidence < 0.01, photos named):", never_misses)
    print("said out of habit (word, hallucinated, said with evidence < 0.1):", habits)
    print("hold_words =", tuple(dict.fromkeys(w for w, *_ in never_misses + habits)))


if __name__ == "__main__":
    main()
