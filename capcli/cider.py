"""CIDEr-D against a fixed corpus, fast enough to be a training reward (self-critical training).

``capcli evaluate`` scores with pycocoevalcap itself. Its ``Cider`` scorer takes document frequencies from the
references passed in each call: right for scoring a whole split, wrong for a reward over one batch (a batch of
64 images is a different "corpus" every time). ``CiderD`` here computes the same quantity as
pycocoevalcap's ``CiderScorer`` (n = 1..4, TF-IDF vectors, clipped candidate weights, Gaussian length
penalty with sigma 6, x 10) with document frequencies taken once, from the training references, and with
each image's reference vectors computed once. Inputs are token lists (already tokenised).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

Ngrams = Counter  # n-gram (a tuple of words) -> count, for n = 1..4


def ngrams(words: Sequence[str], n: int = 4) -> Ngrams:
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of candidate captions against the references of images of a fixed corpus."""

    def __init__(self, references: Mapping[int, Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        counts = {img: [ngrams(r, n) for r in refs] for img, refs in references.items()}
        for refs in counts.values():
            df.update({g for r in refs for g in r})
        self.log_docs = math.log(float(len(references)))
        self.log_df = {g: math.log(max(1.0, c)) for g, c in df.items()}
        self.refs = {img: [self._vec(r) for r in rs] for img, rs in counts.items()}

    def _vec(self, counts: Ngrams) -> tuple[list[dict], list[float], int]:
        """TF-IDF vectors per n, their norms, and the length as pycocoevalcap counts it (its bigrams)."""
        vec: list[dict] = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (self.log_docs - self.log_df.get(g, 0.0))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: int, words: Sequence[str]) -> float:
        """CIDEr-D of one candidate caption (a token list) for ``image``."""
        hv, hn, hl = self._vec(ngrams(words, self.n))
        refs = self.refs[image]
        total = 0.0
        for rv, rn, rl in refs:
            penalty = math.exp(-((hl - rl) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                ref_k = rv[k]
                val = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0) for g, w in hv[k].items())
                if hn[k] != 0 and rn[k] != 0:
                    val /= hn[k] * rn[k]
                total += val * penalty / self.n
        return total / len(refs) * 10.0
