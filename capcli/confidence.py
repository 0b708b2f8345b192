"""Confidence: the calibrated probability that a caption names no object that is not in the photo.

The label is CHAIR's (:mod:`capcli.chair`): a caption is right (1) when every COCO object it names is named by
the photo's reference captions too. A logistic regression over a handful of features of the record, all known
at captioning time, gives the probability:

- ``mean_logprob``: the caption's log-probability per token (``logprob / (words + 1)``, the end token counted);
- ``words``: the caption's length;
- ``top_label``: the evidence of the photo's top grounding label (0 without labels);
- ``objects``, ``objects_not_person``: how many COCO objects it names (people are rarely made up, benches,
  balls and dogs are);
- ``names_table_word``: whether it names a word the ImageNet word table covers;
- ``min_label_evidence``: ``log(e + 0.001)`` of the least evidence among those words (``e`` is the word's label
  evidence, 0 when it is not among the labels), 0 when it names none.

It is fitted on one half of Flickr8k val (``scripts/fit_confidence.py``), its calibration measured on the other
half, and stored in ``assets/confidence-flickr8k-attention.json`` with the SHA-256 of the checkpoint file it was
fitted for: only that checkpoint (the shipped default), captioned with grounding on, gets a ``confidence``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .chair import chair, objects_in
from .errors import CheckpointError

ASSET = Path(__file__).resolve().parent / "assets" / "confidence-flickr8k-attention.json"
FEATURES = ("mean_logprob", "words", "top_label", "objects", "objects_not_person", "names_table_word",
            "min_label_evidence")
_FLOOR = 1e-3  # evidence floor inside the log


@functools.cache
def _table_forms() -> dict[str, str]:
    """Caption token -> the word-table word it is a form of (``dogs`` -> ``dog``)."""
    from .grounding_table import load_word_table

    return {f: w for w, info in load_word_table().words.items() for f in info.forms}


def features(caption: str, logprob: float, labels: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """The features of one captioned record (its ``caption``, ``logprob`` and grounding ``labels``)."""
    tokens = caption.split()
    objects = objects_in(caption)
    evidence = {str(lab["word"]): float(lab["p"]) for lab in labels or []}
    forms = _table_forms()
    named = [evidence.get(forms[t], 0.0) for t in tokens if t in forms]
    return {
        "mean_logprob": logprob / (len(tokens) + 1),
        "words": float(len(tokens)),
        "top_label": max(evidence.values(), default=0.0),
        "objects": float(len(objects)),
        "objects_not_person": float(len(objects - {"person"})),
        "names_table_word": float(bool(named)),
        "min_label_evidence": math.log(min(named) + _FLOOR) if named else 0.0,
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ConfidenceModel:
    """A fitted logistic regression over :data:`FEATURES` (standardised by ``means``/``stds``)."""

    features: list[str]
    coef: list[float]
    intercept: float
    means: list[float]
    stds: list[float]
    checkpoint_sha256: str = ""  # the checkpoint file it was fitted for
    measured: dict[str, Any] = field(default_factory=dict)  # ECE, n, base rate... on the held-apart photos

    def __post_init__(self) -> None:
        if list(self.features) != list(FEATURES):
            raise CheckpointError(f"confidence model: features {self.features} are not capcli's {list(FEATURES)}")
        if not len(self.coef) == len(self.means) == len(self.stds) == len(FEATURES):
            raise CheckpointError("confidence model: coef, means and stds must have one entry per feature")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ConfidenceModel:
        try:
            return cls(list(doc["features"]), [float(x) for x in doc["coef"]], float(doc["intercept"]),
                       [float(x) for x in doc["means"]], [float(x) for x in doc["stds"]],
                       str(doc.get("checkpoint_sha256", "")), dict(doc.get("measured", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"confidence model: malformed ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path = ASSET) -> ConfidenceModel:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read confidence model {path}: {e}") from None

    def probability(self, x: Mapping[str, float]) -> float:
        """P(no hallucinated object) for one record's :func:`features`."""
        z = self.intercept + sum(c * (x[k] - m) / s for k, c, m, s in
                                 zip(self.features, self.coef, self.means, self.stds, strict=True))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def __call__(self, caption: str, logprob: float, labels: Sequence[Mapping[str, Any]] | None) -> float:
        return self.probability(features(caption, logprob, labels))


def for_checkpoint(path: str | Path | None, asset: Path = ASSET) -> ConfidenceModel | None:
    """The confidence model fitted for the checkpoint file at ``path``, or None (no calibration for it)."""
    if path is None or not asset.is_file() or not Path(path).is_file():
        return None
    model = ConfidenceModel.load(asset)
    return model if model.checkpoint_sha256 == file_sha256(path) else None


# ------------------------------------------------------------------------------------- fitting and measuring
def held_apart(file_name: str) -> bool:
    """Whether a photo is in the half of Flickr8k val that calibration is measured on (never fitted on):
    a fixed split by the SHA-1 of the file name, so any run, test or refit sees the same halves."""
    return int(hashlib.sha1(file_name.encode("utf-8")).hexdigest(), 16) % 2 == 1


def outcomes(captions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> dict[int, float]:
    """The label confidence predicts, per image: 1.0 when its caption names no COCO object that none of its
    references names (CHAIR, :func:`capcli.chair.chair`), else 0.0."""
    per = chair(captions, references).per_image
    return {i: 0.0 if per[i].hallucinated else 1.0 for i in captions}


def calibration_bins(p: Sequence[float], y: Sequence[float], bins: int = 10) -> list[tuple[int, float, float]]:
    """Per equal-width bin of predicted probability: (count, mean prediction, observed rate); empty bins kept as
    (0, nan, nan)."""
    rows: list[list[float]] = [[0, 0.0, 0.0] for _ in range(bins)]
    for pi, yi in zip(p, y, strict=True):
        row = rows[min(int(pi * bins), bins - 1)]
        row[0] += 1
        row[1] += pi
        row[2] += yi
    return [(int(n), s / n, t / n) if n else (0, math.nan, math.nan) for n, s, t in rows]


def expected_calibration_error(p: Sequence[float], y: Sequence[float], bins: int = 10) -> float:
    """ECE: the count-weighted mean |mean prediction - observed rate| over ``bins`` equal-width bins."""
    total = len(p)
    return sum(n / total * abs(mp - rate) for n, mp, rate in calibration_bins(p, y, bins) if n)


def fit(rows: Sequence[Mapping[str, float]], y: Sequence[float], l2: float = 1e-2) -> ConfidenceModel:
    """A logistic regression on standardised :data:`FEATURES`, L2 penalty ``l2`` (not on the intercept), by
    L-BFGS."""
    import torch

    x = torch.tensor([[r[k] for k in FEATURES] for r in rows], dtype=torch.float64)
    t = torch.tensor(list(y), dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(z.size(1), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return ConfidenceModel(list(FEATURES), [round(float(c), 6) for c in w.detach()], round(float(b.detach()), 6),
                           [round(float(m), 6) for m in mu], [round(float(s), 6) for s in sd])
