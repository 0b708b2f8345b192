"""Choose grounding's thresholds (``GroundingPolicy``) on out-of-fold captions of Flickr8k's training photos.

Flickr8k val has 1,000 photos, and thresholds chosen on them alone did not carry over: on Flickr8k test grounding
cost 0.35 BLEU-4 and 1.3 CIDEr (issue #25). Here they are chosen on six times as many photos that no model chose
anything on: Flickr8k train + restval (6,091 photos) split in two by a fixed hash of the file name; a model trained
on each half (the recipe's cross-entropy attention model, recipes/flickr8k-default.sh) captions the other half. Each
photo's caption then comes from a model that never saw it, as a test photo's does. Then Flickr8k val confirms.

    # 1. the two folds (fold K holds out its photos as "test"; its model trains on the other half, selects on val)
    python scripts/fit_grounding.py folds ../shared/data/flickr8k --out $CAPCLI_HOME/src
    capcli prepare $CAPCLI_HOME/src/f8k-fold0 --name f8k-fold0     # and fold1
    capcli train --dataset f8k-fold0 --features $CAPCLI_HOME/features/flickr8k/efficientnet-lite0 ...  # the recipe
    # 2. plain captions of each fold's held-out half (cached), then the search over thresholds
    python scripts/fit_grounding.py sweep --fold f8k-fold0=RUN0/best.pt --fold f8k-fold1=RUN1/best.pt
    # 3. the same scoring of one policy on another split (Flickr8k val with the shipped model)
    python scripts/fit_grounding.py score --fold flickr8k:val=capcli/assets/flickr8k-attention.pt [--set hold=0.01]

The captions are those of ``capcli evaluate`` (beam 3, float32, the plain search, then the repair search where a
caption breaks its plan, kept as ``grounding.repair_kept`` keeps it; the sentence rules on in both), read from the
cached features instead of the photos. The scores are pycocoevalcap's
quantities on capcli's Python tokenisation: BLEU-4 pooled over the photos (the "closest" reference length), CIDEr-D
with document frequencies from the scored photos' references (capcli/cider.py), CHAIR_s (capcli/chair.py).

The rule (``sweep``): starting from the shipped policy, each threshold in turn (``--params``, in order) takes the
value from its grid that gives the lowest CHAIR_s among the values whose BLEU-4 and CIDEr are not below the plain
captions' on the pooled out-of-fold photos and on each fold alone. CHAIR_s differences under ``CHAIR_TIE`` are
ties, settled by the margin (the worse fold's CIDEr gain: the fold models are weaker than the shipped one, and
grounding gains less on a stronger model), then by fewer captions changed. ``--passes 0`` shows each value alone.
coco-mini is never read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from capcli import paths
from capcli.captioner import Captioner
from capcli.chair import objects_in
from capcli.cider import CiderD
from capcli.features import FeatureStore
from capcli.grounding import Grounder, GroundingPolicy, Plan, repair_kept
from capcli.grounding_table import load_word_table
from capcli.layout import open_dataset
from capcli.search import search
from capcli.vocab import tokenize

BEAM, MAX_LEN, BATCH = 3, 20, 50
# Cached captions are of the search of this name: the shipped one (Captioner.search_options: sentence rules, banned
# specials), a repair kept as grounding.repair_kept keeps it. A change to the search renames it.
SEARCH = "search-2026-12-07d"
# CHAIR_s differences below this (points; 12 of 6,091 captions) are noise next to a CIDEr margin: a tie.
CHAIR_TIE = 0.2
# The hold words select_hold_words.py found the evidence never misses (without the words said out of habit).
NEVER_MISSED = ("dog", "bird", "cliff", "canoe", "guitar", "shop", "racket")
# The values each threshold may take (the shipped value is always among them), those that act on familiar photos
# first. A value above 1 turns a rule off (no evidence reaches it).
GRID: dict[str, tuple] = {
    "person_p": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "hold": (0.0, 0.003, 0.01, 0.03),
    "hold_words": (GroundingPolicy().hold_words, NEVER_MISSED),
    "say": (0.5, 0.6, 0.7, 0.8, 0.9, 1.01),
    "known": (100, 200, 400, 1500),
    "scene": (0.4, 0.5, 0.6, 0.8, 1.01),
    "hold_unfamiliar": (0.03, 0.1, 0.2),
    "hold_objects": (0.0, 0.003, 0.01, 0.03, 0.1),
    "person_unfamiliar": (0.5, 0.77, 0.9, 0.95),
    "say_unfamiliar": (0.2, 0.3, 0.5, 1.01),
    "animal": (0.05, 0.1, 0.2),
    "repair_beams": (1, 2, 3),
}


# ------------------------------------------------------------------------------------------------ the folds
def fold_of(file_name: str, k: int = 2) -> int:
    """A photo's fold: SHA-1 of its file name modulo ``k`` (stable across machines and orderings)."""
    return int(hashlib.sha1(file_name.encode()).hexdigest(), 16) % k


def write_folds(source: Path, out: Path) -> None:
    """Source folders f8k-fold0 and f8k-fold1 beside each other in ``out``: the Flickr8k captions and photos
    (links), and a splits.json whose train is the other half of train + restval, val is Flickr8k val, and test is
    the fold's own half (the photos its model will caption)."""
    splits = json.loads((source / "splits.json").read_text())
    pool = splits["train"] + splits.get("restval", [])
    halves = [[f for f in pool if fold_of(f) == k] for k in (0, 1)]
    for k in (0, 1):
        d = out / f"f8k-fold{k}"
        d.mkdir(parents=True, exist_ok=True)
        for name in ("captions.json", "images"):
            if not (d / name).exists():
                os.symlink((source / name).resolve(), d / name)
        doc = {"dataset": "flickr8k", "train": halves[1 - k], "val": splits["val"], "test": halves[k]}
        (d / "splits.json").write_text(json.dumps(doc))
        print(f"{d}: train {len(halves[1 - k])}, val {len(splits['val'])}, test {len(halves[k])}")


# ------------------------------------------------------------------------------------------------ captions
@dataclass
class Fold:
    """One model's photos: their ImageNet logits, familiarity, plain captions, and the repair searches so far."""

    name: str
    cap: Captioner
    ids: list[int]
    refs: dict[int, list[str]]
    grids: torch.Tensor  # (n, N, D) float16
    logits: torch.Tensor  # (n, 1000)
    outside: torch.Tensor | None  # (n,) bool
    plain: list[list[int]]
    cache: Path  # the plain captions' cache file; the repairs go beside it
    repaired: dict[tuple, list[int]] = field(default_factory=dict)  # (row, beams, say, banned, say_any) -> tokens


def load_fold(spec: str, features: Path, cache: Path) -> Fold:
    """``DATASET[:SPLIT]=CHECKPOINT`` (split: test) -> the fold with its plain captions (cached in ``cache``)."""
    where, ckpt = spec.split("=", 1)
    dataset, _, split = where.partition(":")
    ds = open_dataset(dataset)
    recs = ds.split(split or "test")
    cap = Captioner.load(ckpt, device="cpu", precision="float32", grounding="auto")
    store = FeatureStore(features)
    ids = [r.id for r in recs]
    grids = torch.from_numpy(store.get_many(ids, "grid"))
    tag = hashlib.sha1(f"{SEARCH}:{Path(ckpt).resolve()}:{os.path.getmtime(ckpt)}:{ids}".encode()).hexdigest()[:12]
    path = cache / f"{dataset}-{split or 'test'}-{tag}.pt"
    if path.is_file():
        saved = torch.load(path)
        logits, outside, plain = saved["logits"], saved["outside"], saved["plain"]
    else:
        logits, outside, plain = _plain(cap, grids)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": logits, "outside": outside, "plain": plain}, path)
    fold = Fold(f"{dataset}:{split or 'test'}", cap, ids, ds.references(split or "test"), grids, logits, outside,
                plain, path)
    rep = path.with_suffix(".repairs.pt")
    if rep.is_file():
        fold.repaired = torch.load(rep)
    return fold


def _plain(cap: Captioner, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]]]:
    """The ImageNet logits, the familiarity and the plain beam-3 caption of every photo."""
    opts, logits, outside, plain = cap.search_options(BEAM, MAX_LEN), [], [], []
    with torch.inference_mode():
        for s in range(0, len(grids), BATCH):
            grid = grids[s: s + BATCH].float()
            logits.append(cap.encoder.imagenet_logits(grid))
            if cap.familiarity is not None:
                outside.append(cap.familiarity.outside(grid))
            hyps = search(cap.model, cap.model.features_of_kind(grid, cap.model.feature_kind), opts,
                          greedy_at_1=False)
            plain += [h[0].tokens for h in hyps]
            print(f"  plain captions {len(plain)}/{len(grids)}", flush=True)
    return torch.cat(logits), torch.cat(outside) if outside else None, plain


def grounded(fold: Fold, policy: GroundingPolicy) -> tuple[dict[int, str], int]:
    """The grounded caption of every photo under ``policy`` (as ``Captioner._grounded_search``), and how many
    were searched again. Repair searches are cached by what they depend on."""
    cap = fold.cap
    opts = cap.search_options(BEAM, MAX_LEN)
    g = Grounder(load_word_table(), cap.vocab, policy)
    plans = g.plans(fold.logits, fold.outside)
    redo = [i for i, (p, t) in enumerate(zip(plans, fold.plain, strict=True)) if not g.keeps(p, t)]
    keys = {i: _key(g, plans[i], i, policy.repair_beams) for i in redo}
    todo = [i for i in redo if keys[i] not in fold.repaired]
    with torch.inference_mode():
        for s in range(0, len(todo), BATCH):
            rows = todo[s: s + BATCH]
            grid = fold.grids[rows].float()
            hyps = search(cap.model, cap.model.features_of_kind(grid, cap.model.feature_kind), opts,
                          extra_beams=policy.repair_beams,
                          constraints=g.constraints([plans[i] for i in rows], grid.device))
            for i, h in zip(rows, hyps, strict=True):
                fold.repaired[keys[i]] = h[0].tokens
    tokens = {i: fold.repaired[keys[i]] for i in redo
              if repair_kept(g, plans[i], fold.plain[i], fold.repaired[keys[i]])}
    return ({fold.ids[i]: " ".join(g.words_of(plans[i], tokens.get(i, fold.plain[i]))) for i in range(len(plans))},
            len(redo))


def _key(g: Grounder, plan: Plan, row: int, beams: int) -> tuple:
    say = tuple(tuple(g.names[w]) for w in plan.say)
    say_any = tuple(sorted({t for w in plan.say_any for t in g.names[w]}))
    return row, beams, say, tuple(g.banned(plan)), say_any


def plain_captions(fold: Fold) -> dict[int, str]:
    return {fold.ids[i]: fold.cap.vocab.to_text(t) for i, t in enumerate(fold.plain)}


# ------------------------------------------------------------------------------------------------ scores
@dataclass
class Stats:
    """One caption's share of the corpus scores: BLEU's counts, CIDEr-D, whether it hallucinates an object."""

    testlen: int
    reflen: int
    guess: tuple[int, ...]
    correct: tuple[int, ...]
    cider: float
    hallucinates: bool


class Scorer:
    """Corpus BLEU-4, CIDEr-D and CHAIR_s of one caption per photo, each caption's share computed once."""

    def __init__(self, refs: dict[int, list[str]]) -> None:
        self.refs = {i: [tokenize(r) for r in rs] for i, rs in refs.items()}
        self.cider = CiderD(self.refs)
        self.truth = {i: set().union(*(objects_in(r) for r in rs)) for i, rs in refs.items()}
        self.ref_counts = {i: [Counter(_ngrams(r)) for r in rs] for i, rs in self.refs.items()}
        self.cache: dict[tuple[int, str], Stats] = {}

    def stats(self, i: int, caption: str) -> Stats:
        key = (i, caption)
        if key not in self.cache:
            words = tokenize(caption)
            counts = Counter(_ngrams(words))
            best: Counter = Counter()
            for rc in self.ref_counts[i]:
                best |= rc
            lens = [len(r) for r in self.refs[i]]
            reflen = min(lens, key=lambda n: (abs(n - len(words)), n))
            correct = tuple(sum(min(c, best[g]) for g, c in counts.items() if len(g) == k) for k in range(1, 5))
            guess = tuple(max(0, len(words) - k + 1) for k in range(1, 5))
            self.cache[key] = Stats(len(words), reflen, guess, correct, self.cider.score(i, words),
                                    bool(objects_in(caption) - self.truth[i]))
        return self.cache[key]

    def score(self, captions: dict[int, str], ids: list[int] | None = None) -> dict[str, float]:
        ids = ids if ids is not None else sorted(captions)
        st = [self.stats(i, captions[i]) for i in ids]
        return {"BLEU-4": 100 * bleu4(st), "CIDEr": 100 * sum(s.cider for s in st) / len(st),
                "CHAIR_s": 100 * sum(s.hallucinates for s in st) / len(st)}


def _ngrams(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[s: s + k]) for k in range(1, 5) for s in range(len(words) - k + 1)]


def bleu4(st: list[Stats]) -> float:
    """pycocoevalcap's corpus BLEU-4 (its BleuScorer, option "closest") from per-caption counts."""
    testlen, reflen = sum(s.testlen for s in st), sum(s.reflen for s in st)
    logs = 0.0
    for k in range(4):
        logs += math.log((sum(s.correct[k] for s in st) + 1e-15) / (sum(s.guess[k] for s in st) + 1e-9))
    brevity = min(0.0, 1 - reflen / (testlen + 1e-15))
    return math.exp(logs / 4 + brevity)


# ------------------------------------------------------------------------------------------------ the search
@dataclass
class Result:
    policy: GroundingPolicy
    per_fold: list[dict[str, float]]  # grounded minus plain, per fold
    pooled: dict[str, float]  # grounded minus plain, all photos
    grounded: dict[str, float]
    changed: int

    @property
    def margin(self) -> float:
        return round(min(d["CIDEr"] for d in self.per_fold), 2)

    @property
    def feasible(self) -> bool:
        return all(d["BLEU-4"] >= 0 and d["CIDEr"] >= 0 for d in [*self.per_fold, self.pooled])


class Search:
    """Policies scored against the plain captions of every fold."""

    def __init__(self, folds: list[Fold]) -> None:
        self.folds = folds
        self.scorers = [Scorer(f.refs) for f in folds]
        self.plain = [plain_captions(f) for f in folds]
        self.base = [s.score(p) for s, p in zip(self.scorers, self.plain, strict=True)]
        self.seen: dict[GroundingPolicy, Result] = {}

    def pooled(self, captions: list[dict[int, str]]) -> dict[str, float]:
        st = [s.stats(i, c[i]) for s, c in zip(self.scorers, captions, strict=True) for i in sorted(c)]
        return {"BLEU-4": 100 * bleu4(st), "CIDEr": 100 * sum(x.cider for x in st) / len(st),
                "CHAIR_s": 100 * sum(x.hallucinates for x in st) / len(st)}

    def run(self, policy: GroundingPolicy) -> Result:
        if policy in self.seen:
            return self.seen[policy]
        caps, changed = [], 0
        for f in self.folds:
            c, _ = grounded(f, policy)
            caps.append(c)
        changed = sum(c[i] != p[i] for c, p in zip(caps, self.plain, strict=True) for i in c)
        per = [s.score(c) for s, c in zip(self.scorers, caps, strict=True)]
        g, b = self.pooled(caps), self.pooled(self.plain)
        res = Result(policy, [_minus(x, y) for x, y in zip(per, self.base, strict=True)], _minus(g, b), g, changed)
        self.seen[policy] = res
        return res

    def save(self) -> None:
        for f in self.folds:
            torch.save(f.repaired, f.cache.with_suffix(".repairs.pt"))


def _minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(a[k] - b[k], 3) for k in a}


def better(a: Result, b: Result) -> bool:
    """Whether ``a`` beats ``b``: feasible first; then lower CHAIR_s, where it differs by at least ``CHAIR_TIE``
    points; else the larger margin, the worse fold's CIDEr gain over the plain captions (a margin is what carries
    over to a stronger model, on which grounding gains less); then fewer captions changed."""
    if a.feasible != b.feasible:
        return a.feasible
    if abs(a.grounded["CHAIR_s"] - b.grounded["CHAIR_s"]) >= CHAIR_TIE:
        return a.grounded["CHAIR_s"] < b.grounded["CHAIR_s"]
    return (a.margin, -a.changed) > (b.margin, -b.changed)


def coordinate_search(search: Search, start: GroundingPolicy, passes: int = 2,
                      params: tuple[str, ...] = tuple(GRID)) -> Result:
    best = search.run(start)
    show("start", best)
    if passes == 0:  # each threshold's values one at a time from ``start``, to read each rule's effect
        for name in params:
            for v in GRID[name]:
                show(f"{name}={_short(v)}", search.run(replace(start, **{name: v})))
        return best
    for p in range(passes):
        for name in params:
            for v in GRID[name]:
                res = search.run(replace(best.policy, **{name: v}))
                show(f"pass {p + 1} {name}={_short(v)}", res)
                if better(res, best):
                    best = res
            print(f"-> {name} = {_short(getattr(best.policy, name))}", flush=True)
            search.save()  # the repair searches so far, for a rerun
    return best


def warm(fold: Fold, start: GroundingPolicy) -> None:
    """The repair searches of every policy one grid step from ``start``, for one fold (saved as it goes)."""
    for name, values in GRID.items():
        for v in values:
            _, redo = grounded(fold, replace(start, **{name: v}))
            print(f"{fold.name} {name}={_short(v)}: {redo} searched again, {len(fold.repaired)} cached", flush=True)
        torch.save(fold.repaired, fold.cache.with_suffix(".repairs.pt"))


def _short(value: object) -> str:
    return f"{len(value)} words" if isinstance(value, tuple) else str(value)


def show(label: str, r: Result) -> None:
    d = r.pooled
    folds = "  ".join(f"f{k}: {x['BLEU-4']:+.2f}/{x['CIDEr']:+.2f}" for k, x in enumerate(r.per_fold))
    print(f"{label:34s} B4 {d['BLEU-4']:+.2f} CIDEr {d['CIDEr']:+.2f} CHAIR_s {r.grounded['CHAIR_s']:.2f} "
          f"({d['CHAIR_s']:+.2f}) changed {r.changed:4d} {'ok ' if r.feasible else 'NO '} {folds}", flush=True)


def bootstrap(search: Search, policy: GroundingPolicy, n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% paired-bootstrap intervals (over photos) of grounded minus plain, on the pooled photos."""
    caps = [grounded(f, policy)[0] for f in search.folds]
    pairs = [(s.stats(i, c[i]), s.stats(i, p[i])) for s, c, p in zip(search.scorers, caps, search.plain,
                                                                     strict=True) for i in sorted(c)]
    rng, out = random.Random(seed), {"BLEU-4": [], "CIDEr": [], "CHAIR_s": []}
    for _ in range(n):
        pick = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        g, b = [x for x, _ in pick], [y for _, y in pick]
        out["BLEU-4"].append(100 * (bleu4(g) - bleu4(b)))
        out["CIDEr"].append(100 * sum(x.cider - y.cider for x, y in pick) / len(pick))
        out["CHAIR_s"].append(100 * sum(x.hallucinates - y.hallucinates for x, y in pick) / len(pick))
    return {k: (round(sorted(v)[int(0.025 * n)], 2), round(sorted(v)[int(0.975 * n)], 2)) for k, v in out.items()}


def by_familiarity(search: Search, policy: GroundingPolicy) -> None:
    """Grounded and plain scores of the photos each fold's model finds familiar, and of the rest."""
    caps = [grounded(f, policy)[0] for f in search.folds]
    for label, want in (("familiar", False), ("unfamiliar", True)):
        g, b, n = [], [], 0
        for f, s, c, p in zip(search.folds, search.scorers, caps, search.plain, strict=True):
            rows = [r for r in range(len(f.ids)) if f.outside is None or bool(f.outside[r]) == want]
            g += [s.stats(f.ids[r], c[f.ids[r]]) for r in rows]
            b += [s.stats(f.ids[r], p[f.ids[r]]) for r in rows]
            n += len(rows)
        if n:
            print(f"{label} photos ({n}): grounded BLEU-4 {100 * bleu4(g):.2f} CIDEr "
                  f"{100 * sum(x.cider for x in g) / n:.2f} CHAIR_s {100 * sum(x.hallucinates for x in g) / n:.2f}; "
                  f"plain {100 * bleu4(b):.2f} {100 * sum(x.cider for x in b) / n:.2f} "
                  f"{100 * sum(x.hallucinates for x in b) / n:.2f}")


def parse_set(items: list[str]) -> dict[str, float | int]:
    types = {f.name: f.type for f in fields(GroundingPolicy)}
    out: dict[str, float | int] = {}
    for item in items:
        k, v = item.split("=", 1)
        out[k] = int(v) if types[k] in ("int", int) else float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folds", help="write the two fold source folders")
    f.add_argument("source", type=Path)
    f.add_argument("--out", type=Path, required=True)
    for name in ("sweep", "score", "warm"):
        s = sub.add_parser(name)
        s.add_argument("--fold", action="append", required=True, help="DATASET[:SPLIT]=CHECKPOINT (split: test)")
        s.add_argument("--features", type=Path, default=None, help="default: ROOT/features/flickr8k/efficientnet-lite0")
        s.add_argument("--cache", type=Path, default=paths.home() / "fit-grounding")
        s.add_argument("--set", action="append", default=[], help="NAME=VALUE over the shipped policy")
        s.add_argument("--bootstrap", type=int, default=0, help="resamples for intervals of the result (0: none)")
        s.add_argument("--passes", type=int, default=2,
                       help="sweep: passes over the thresholds (0: each value alone from the start)")
        s.add_argument("--params", default=",".join(GRID), help="sweep: the thresholds to search, in order")
    args = ap.parse_args()
    if args.cmd == "folds":
        write_folds(args.source, args.out)
        return
    features = args.features or paths.features_dir("flickr8k", "efficientnet-lite0")
    if args.cmd == "warm":  # one process per fold, side by side: the sweep's first pass then finds them cached
        warm(load_fold(args.fold[0], features, args.cache), replace(GroundingPolicy(), **parse_set(args.set)))
        return
    search = Search([load_fold(spec, features, args.cache) for spec in args.fold])
    for fold, base in zip(search.folds, search.base, strict=True):
        print(f"{fold.name}: {len(fold.ids)} photos, plain {base}")
    start = replace(GroundingPolicy(), **parse_set(args.set))
    try:
        if args.cmd == "sweep":
            best = coordinate_search(search, start, args.passes, tuple(args.params.split(",")))
        else:
            best = search.run(start)
    finally:
        search.save()
    show("result", best)
    print("policy:", best.policy)
    print("grounded:", best.grounded, "minus plain:", best.pooled)
    by_familiarity(search, best.policy)
    if args.bootstrap:
        print("95% intervals, grounded minus plain:", bootstrap(search, best.policy, args.bootstrap))


if __name__ == "__main__":
    main()
