"""Caption confidence: the shipped model, its features (the caption's probability, familiarity, labels, person
evidence), the judged set it was fitted on, and the label-style alt text offered below --min-confidence.

Real forward passes of the shipped model on the example photos and on judged Flickr8k val photos; no mocks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from capcli import confidence
from capcli.alttext import NO_DESCRIPTION, alt_text, label_alt_text
from capcli.captioner import DEFAULT_MODEL, Captioner
from capcli.confidence import FEATURES, ConfidenceModel, Evidence
from capcli.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
JUDGED = ROOT / "data" / "judged" / "flickr8k-val-judged.jsonl"


@pytest.fixture(scope="module")
def grounded() -> Captioner:
    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def shipped() -> ConfidenceModel:
    return ConfidenceModel.load()


def test_the_asset_loads_and_says_what_it_measured(shipped) -> None:
    assert shipped.features == list(FEATURES)
    assert len(shipped.coef) == len(shipped.means) == len(shipped.stds) == len(FEATURES)
    assert all(s > 0 for s in shipped.stds)
    assert shipped.checkpoint_sha256 == confidence.file_sha256(DEFAULT_MODEL)
    cv = shipped.measured["judged_cross_validated"]
    assert cv["n"] >= 250 and 0 < cv["right"] < 1
    assert cv["ece"] < 0.1 and cv["auc"] > 0.65  # a refit measuring worse fails here: look at docs/reliability.png
    assert shipped.measured["val_unseen_chair"]["right_at_0.9"] >= 0.95  # the familiar case keeps its promise
    assert ConfidenceModel.from_dict(json.loads(json.dumps(shipped.to_dict()))) == shipped


def test_a_model_with_other_features_is_refused(shipped) -> None:
    doc = shipped.to_dict() | {"features": list(reversed(FEATURES))}
    with pytest.raises(CheckpointError, match="features"):
        ConfidenceModel.from_dict(doc)
    with pytest.raises(CheckpointError, match="malformed"):
        ConfidenceModel.from_dict({"features": list(FEATURES)})


def test_confidence_is_a_probability_on_the_example_photos(grounded, example_photos) -> None:
    assert grounded.confidence is not None
    recs = list(grounded.caption_paths(example_photos))
    assert all(0.0 <= r["confidence"] <= 1.0 for r in recs)
    assert len({r["confidence"] for r in recs}) > 1


def test_features_follow_the_caption() -> None:
    labels = [{"word": "dog", "p": 0.8}, {"word": "bench", "p": 0.1}]
    dog = confidence.features("a dog runs on a bench", -4.0, labels, Evidence(1.2, 0.3))
    assert dog["objects_not_person"] == 2 and dog["names_top_label"] == 1.0 and dog["top_label"] == 0.8
    assert dog["mean_logprob"] == pytest.approx(-4.0 / 7)
    assert dog["unfamiliar"] == 1.2 and dog["person_doubt"] == 0.0  # no person named: the evidence does not count
    assert dog["min_label_evidence"] == pytest.approx(math.log(0.101))  # the bench's
    # a named word the labels do not back gets the evidence floor; a caption that misses the top label says so
    cat = confidence.features("a cat runs", -2.0, labels)
    assert cat["min_label_evidence"] == pytest.approx(math.log(1e-3)) and cat["names_top_label"] == 0.0
    assert math.isnan(cat["unfamiliar"])  # no evidence: unknown
    man = confidence.features("a man runs", -2.0, None, Evidence(0.9, 0.05))
    assert man["person_doubt"] == pytest.approx(math.log(0.051)) and man["objects_not_person"] == 0
    assert math.isnan(confidence.features("a man runs", -2.0, None)["person_doubt"])


def test_an_unknown_feature_counts_as_its_mean(shipped) -> None:
    x = confidence.features("a man runs on the grass", -3.0, [{"word": "dog", "p": 0.9}])
    at_mean = x | {"person_doubt": shipped.means[FEATURES.index("person_doubt")],
                   "unfamiliar": shipped.means[FEATURES.index("unfamiliar")]}
    assert shipped.probability(x) == pytest.approx(shipped.probability(at_mean))
    # a photo far off the training photos gets less confidence than a familiar one, all else alike; a person named
    # where the photo's classes say no person, less than where they say one
    i, j = FEATURES.index("unfamiliar"), FEATURES.index("person_doubt")
    assert shipped.coef[i] < 0 and shipped.coef[j] > 0
    assert shipped.probability(x | {"unfamiliar": 1.3}) < shipped.probability(x | {"unfamiliar": 0.8})
    no_person, person = Evidence(0.9, 0.05), Evidence(0.9, 0.95)
    assert shipped("a man runs on the grass", -3.0, None, no_person) < shipped("a man runs on the grass", -3.0,
                                                                                 None, person)


def test_records_confidence_is_the_plans_evidence(grounded, example_photos) -> None:
    """The confidence a record carries is the model's probability of its caption's features with the photo's
    familiarity distance and person evidence as grounding planned them (no other pass over the photo)."""
    images = torch.stack([grounded.spec.read(p) for p in example_photos])
    feats, plans = grounded._encode(images)
    recs = grounded._decode(feats, plans, grounded.search_options(3, 20, 1, 0.0), False)
    assert grounded.familiarity is not None
    pooled = grounded.encoder(images).float().mean(1)
    want = (grounded.familiarity.distance(pooled) / grounded.familiarity.threshold).tolist()
    for rec, plan, d in zip(recs, plans, want, strict=True):
        assert plan.distance == pytest.approx(d, abs=1e-4) and 0.0 <= plan.person <= 1.0
        assert rec["confidence"] == round(grounded.confidence(rec["caption"], rec["logprob"], rec["labels"],
                                                              Evidence(plan.distance, plan.person)), 4)


def test_no_confidence_without_a_calibration(tmp_path, example_photos) -> None:
    # a copy of the shipped checkpoint with one byte more is another checkpoint: it has no calibration
    other = tmp_path / "other.pt"
    shutil.copyfile(DEFAULT_MODEL, other)
    assert confidence.for_checkpoint(other) is not None
    with other.open("ab") as f:
        f.write(b"\0")
    assert confidence.for_checkpoint(other) is None
    assert Captioner.load("basic", device="cpu").confidence is None
    off = Captioner.load(device="cpu", grounding="off")  # fitted on grounded captions only
    assert off.confidence is None
    assert "confidence" not in next(iter(off.caption_paths(example_photos[:1])))


def test_ece_auc_and_bins() -> None:
    assert confidence.expected_calibration_error([0.9] * 10, [1.0] * 9 + [0.0]) == pytest.approx(0.0)
    assert confidence.expected_calibration_error([0.95, 0.05], [0.0, 1.0]) == pytest.approx(0.95)
    bins = confidence.calibration_bins([0.05, 1.0], [1.0, 1.0])
    assert bins[0][0] == 1 and bins[-1] == (1, 1.0, 1.0) and math.isnan(bins[5][1])
    assert confidence.ranking_auc([0.9, 0.8, 0.1], [1.0, 1.0, 0.0]) == 1.0
    assert confidence.ranking_auc([0.5, 0.5], [1.0, 0.0]) == 0.5


def test_fit_refuses_unknown_features() -> None:
    row = confidence.features("a dog runs", -2.0, None)  # no evidence: NaN features
    with pytest.raises(ValueError, match="known"):
        confidence.fit([row, row], [1.0, 0.0])


# ---------------------------------------------------------------------------------------------- judged set
def test_the_judged_set_is_val_photos_with_a_label_each(flickr8k_dir) -> None:
    rows = [json.loads(line) for line in JUDGED.read_text(encoding="utf-8").splitlines()]
    val = set(json.loads((flickr8k_dir / "splits.json").read_text())["val"])
    assert len(rows) >= 250 and len({r["file"] for r in rows}) == len(rows)
    assert all(r["file"] in val and r["caption"] and r["label"] in ("right", "partly", "wrong") for r in rows)
    # half from the least familiar quarter of val, where the errors are
    assert sum(r["familiarity_rank"] <= 250 for r in rows) == pytest.approx(len(rows) / 2, abs=5)
    wrong = {s: sum(r["label"] != "right" for r in rows if r["stratum"] == s) for s in {r["stratum"] for r in rows}}
    assert wrong["least familiar quarter"] > wrong["rest"]


# -------------------------------------------------------------------------------------------------- alt text
def test_label_alt_text_says_only_what_the_evidence_supports() -> None:
    labels = [{"word": "tower", "p": 0.3}, {"word": "rocket", "p": 0.55}, {"word": "dog", "p": 0.06}]
    assert label_alt_text(labels) == "Image may contain: rocket, tower"
    assert label_alt_text(labels, min_evidence=0.05) == "Image may contain: rocket, tower, dog"
    assert label_alt_text(labels, max_labels=1) == "Image may contain: rocket"
    assert label_alt_text([{"word": "dog", "p": 0.1}]) == NO_DESCRIPTION
    assert label_alt_text(None) == NO_DESCRIPTION == label_alt_text([])


def test_alt_text_offers_the_caption_or_the_labels() -> None:
    rec = {"caption": "a dog runs on the beach", "confidence": 0.3, "labels": [{"word": "dog", "p": 0.7}]}
    assert alt_text(rec, None) == rec["caption"]
    assert alt_text(rec, 0.2) == rec["caption"]
    assert alt_text(rec, 0.5) == "Image may contain: dog"
    assert alt_text({"caption": "a cat"}, 0.5) == "a cat"  # no confidence: never low
    assert alt_text({"path": "x.jpg", "error": "unreadable"}, 0.5) is None
