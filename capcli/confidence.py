"""Confidence: the calibrated probability that a caption is right, judged by looking at the photo.

The label is a person's: captions of Flickr8k val photos were judged right / partly / wrong by looking at each
photo (``data/judged/``, over-sampling the photos least like the training photos, where the errors are). A
logistic regression over features of the captioned photo, all known at captioning time, gives the probability
that a caption is *right* (every thing and doing it names is in the photo):

- ``mean_logprob``: the caption's log-probability per token (``logprob / (words + 1)``, the end token counted);
- ``unfamiliar``: how far the photo is from the model's training photos (:mod:`capcli.familiar`: the distance to
  its k-th nearest training photo over the threshold beyond which a photo counts as outside, so 1 is the edge);
  off its training photos the decoder writes Flickr8k's habits, not the photo;
- ``top_label``: the evidence of the photo's top grounding label (0 without labels);
- ``names_top_label``: whether the caption names its top label (the encoder and the caption agree);
- ``min_label_evidence``: ``log(e + 0.001)`` of the least evidence among the caption's ImageNet-table words
  (``e``: the word's label evidence, 0 when it is not among the labels), 0 when it names none;
- ``objects_not_person``: how many COCO objects besides people it names (benches, balls and dogs are made up);
- ``person_doubt``: ``log(p + 0.001)`` of the photo's person evidence ``p`` (grounding's: the ImageNet classes
  that come with people in Flickr8k's photos) when the caption names a person, 0 when it names none: a person
  is what the decoder most often adds to a photo without one;
- ``words``: its length.

Not features: fluency defects (the search cannot write them, ``models/grammar.py``) and the words'
log-probabilities read back through the model, which added nothing on the judged captions and cost a decoder pass
(docs/research.md). Every feature is known once the photo is encoded and searched: confidence costs no model pass.

It is fitted on the judged photos by ``scripts/fit_confidence.py`` (numbers cross-validated there) and stored in
``assets/confidence-flickr8k-attention.json`` with the SHA-256 of the checkpoint file it was fitted for: only that
checkpoint (the shipped default), captioned with grounding on, gets a ``confidence``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chair import objects_in
from .errors import CheckpointError

if TYPE_CHECKING:
    from .grounding import Plan

ASSET = Path(__file__).resolve().parent / "assets" / "confidence-flickr8k-attention.json"
FEATURES = ("mean_logprob", "unfamiliar", "top_label", "names_top_label", "min_label_evidence", "objects_not_person",
            "person_doubt", "words")
_FLOOR = 1e-3  # evidence floor inside the log


@dataclass(frozen=True)
class Evidence:
    """What confidence reads of a captioned photo besides its record, both known once the photo is encoded (its
    grounding :class:`~capcli.grounding.Plan` holds them). Either may be unknown (None): its feature then takes the
    fitted mean, so it moves the probability neither way."""

    distance: float | None = None  # familiarity distance over the familiarity threshold (1: the edge)
    person: float | None = None  # P(a person is in view) from the ImageNet classes that come with people

    @classmethod
    def of(cls, plan: Plan) -> Evidence:
        known = [None if math.isnan(x) else x for x in (plan.distance, plan.person)]
        return cls(*known)


@functools.cache
def _table_forms() -> dict[str, str]:
    """Caption token -> the word-table word it is a form of (``dogs`` -> ``dog``)."""
    from .grounding_table import load_word_table

    return {f: w for w, info in load_word_table().words.items() for f in info.forms}


def features(caption: str, logprob: float, labels: Sequence[Mapping[str, Any]] | None,
             evidence: Evidence = Evidence()) -> dict[str, float]:
    """The features of one captioned record (its ``caption``, ``logprob`` and grounding ``labels``); those
    ``evidence`` does not know are NaN (the model reads them as their mean)."""
    tokens = caption.split()
    evidence_of = {str(lab["word"]): float(lab["p"]) for lab in labels or []}
    top = max(evidence_of, key=evidence_of.__getitem__, default=None)
    forms = _table_forms()
    named_words = {forms[t] for t in tokens if t in forms}
    named = [evidence_of.get(w, 0.0) for w in named_words]
    objects = objects_in(caption)
    person = evidence.person
    return {
        "mean_logprob": logprob / (len(tokens) + 1),
        "unfamiliar": evidence.distance if evidence.distance is not None else math.nan,
        "top_label": evidence_of[top] if top is not None else 0.0,
        "names_top_label": float(top is not None and top in named_words),
        "min_label_evidence": math.log(min(named) + _FLOOR) if named else 0.0,
        "objects_not_person": float(len(objects - {"person"})),
        "person_doubt": (math.nan if person is None else math.log(person + _FLOOR)) if "person" in objects else 0.0,
        "words": float(len(tokens)),
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
    measured: dict[str, Any] = field(default_factory=dict)  # what the fit script measured (cross-validated)

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
        """P(the caption is right) for one record's :func:`features` (a NaN feature counts as its mean)."""
        z = self.intercept + sum(c * (x[k] - m) / s for k, c, m, s in
                                 zip(self.features, self.coef, self.means, self.stds, strict=True)
                                 if not math.isnan(x[k]))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def __call__(self, caption: str, logprob: float, labels: Sequence[Mapping[str, Any]] | None,
                 evidence: Evidence = Evidence()) -> float:
        return self.probability(features(caption, logprob, labels, evidence))


def for_checkpoint(path: str | Path | None, asset: Path = ASSET, sha256: str | None = None) -> ConfidenceModel | None:
    """The confidence model fitted for the checkpoint file at ``path`` (its SHA-256, if the caller has it), or
    None (no calibration for it)."""
    if path is None or not asset.is_file() or not Path(path).is_file():
        return None
    model = ConfidenceModel.load(asset)
    return model if model.checkpoint_sha256 == (sha256 or file_sha256(path)) else None


# ------------------------------------------------------------------------------------- fitting and measuring
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


def ranking_auc(p: Sequence[float], y: Sequence[float]) -> float:
    """The chance that a random right caption gets more confidence than a random wrong one (ties half)."""
    right = [q for q, t in zip(p, y, strict=True) if t]
    wrong = [q for q, t in zip(p, y, strict=True) if not t]
    wins = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def fit(rows: Sequence[Mapping[str, float]], y: Sequence[float], l2: float = 1e-2,
        prior: ConfidenceModel | None = None) -> ConfidenceModel:
    """A logistic regression on standardised :data:`FEATURES`, L2 penalty ``l2`` (not on the intercept) on the
    coefficients' distance from ``prior``'s (from zero without one), by L-BFGS. Every feature must be known (no
    NaN) in the rows fitted on. A ``prior`` fitted on many more photos for a narrower label keeps what it knows
    where a few hundred judged captions cannot tell."""
    import torch

    x = torch.tensor([[r[k] for k in FEATURES] for r in rows], dtype=torch.float64)
    if x.isnan().any():
        raise ValueError("fit: every feature must be known in the rows fitted on")
    t = torch.tensor(list(y), dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w0 = torch.zeros(z.size(1), dtype=torch.float64)
    if prior is not None:  # the prior's coefficients per raw unit, in this standardisation
        w0 = torch.tensor(prior.coef, dtype=torch.float64) / torch.tensor(prior.stds, dtype=torch.float64) * sd
    w = w0.clone().requires_grad_(True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + l2 * ((w - w0) ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return ConfidenceModel(list(FEATURES), [round(float(c), 6) for c in w.detach()], round(float(b.detach()), 6),
                           [round(float(m), 6) for m in mu], [round(float(s), 6) for s in sd])
