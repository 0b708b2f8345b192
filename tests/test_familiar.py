"""Familiarity: nearest-neighbour distances to a model's training photos, stored in its checkpoint, and grounding
being stricter about the photos unlike them. Random features for the arithmetic; the shipped model on real photos."""

from __future__ import annotations

import pytest
import torch

from capcli.captioner import Captioner
from capcli.checkpoint import load_checkpoint, save_checkpoint
from capcli.errors import CheckpointError
from capcli.familiar import Familiarity
from capcli.grounding import person_weights


def _photos(n: int, centre: torch.Tensor, seed: int) -> torch.Tensor:
    """n non-negative "pooled features" (n, D) around ``centre`` (as ReLU features are)."""
    g = torch.Generator().manual_seed(seed)
    return (centre + 0.3 * torch.rand(n, centre.numel(), generator=g)).clamp_min(0)


@pytest.fixture(scope="module")
def fitted() -> tuple[Familiarity, torch.Tensor, torch.Tensor]:
    centre = torch.rand(64, generator=torch.Generator().manual_seed(0))
    train, val = _photos(500, centre, 1), _photos(200, centre, 2)
    return Familiarity.fit(train, val, k=5, quantile=0.9), train, val


def test_the_threshold_is_the_val_quantile_of_the_kth_neighbour_distance(fitted) -> None:
    fam, train, val = fitted
    # by hand, in float32: normalise, all distances, the 5th smallest per val photo, its 0.9 quantile
    ref = torch.nn.functional.normalize(train, dim=1)
    d = torch.cdist(torch.nn.functional.normalize(val, dim=1), ref).sort(dim=1).values[:, 4]
    assert fam.threshold == pytest.approx(float(d.quantile(0.9)), abs=2e-3)  # uint8 storage: within 0.2%
    assert fam.distance(val) == pytest.approx(d, abs=2e-3)
    assert int(fam.outside(val.unsqueeze(1)).sum()) == 20  # a tenth of the val photos (B, N=1, D)


def test_photos_unlike_the_training_photos_are_outside(fitted) -> None:
    fam, train, _ = fitted
    other = _photos(50, torch.rand(64, generator=torch.Generator().manual_seed(9)) * 3, 3)
    assert fam.outside(other.unsqueeze(1)).all()
    twins = torch.cat([train[:1].expand(5, 64), train[1:]])  # a photo the model saw five times
    assert not Familiarity.fit(twins, train[:10]).outside(twins[:1].unsqueeze(1).expand(1, 49, 64)).any()


def test_a_large_training_set_is_sampled(fitted) -> None:
    fam, train, val = fitted
    small = Familiarity.fit(train, val, max_photos=300)
    assert small.photos.shape == (300, 64) and int(small.outside(val.unsqueeze(1)).sum()) == 20
    assert torch.equal(Familiarity.fit(train, val, max_photos=300).photos, small.photos)  # the same sample


def test_it_travels_in_the_checkpoint(fitted, tmp_path) -> None:
    fam, _, val = fitted
    ckpt = {"config": {}, "vocab": {}, "encoder": {"name": "x"}, "model": {}, "familiarity": fam.to_dict()}
    save_checkpoint(tmp_path / "m.pt", ckpt)
    back = Familiarity.of_checkpoint(load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.pt")  # weights_only load
    assert back is not None and back.threshold == fam.threshold and (back.k, back.quantile) == (5, 0.9)
    assert torch.equal(back.distance(val), fam.distance(val))
    assert Familiarity.of_checkpoint({}, tmp_path / "m.pt") is None
    bad = {**ckpt, "familiarity": {**fam.to_dict(), "photos": fam.photos.float()}}
    with pytest.raises(CheckpointError, match="familiarity entry is malformed"):
        Familiarity.of_checkpoint(bad, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="holds 64-d features, its encoder gives 1280"):
        Familiarity.of_checkpoint(ckpt, tmp_path / "m.pt", 1280)


def test_the_shipped_model_knows_its_training_photos() -> None:
    cap = Captioner.load(precision="float32")
    fam = cap.familiarity
    assert fam is not None and fam.photos.shape == (6091, 1280) and (fam.k, fam.quantile) == (5, 0.9)
    assert 0.9 < fam.threshold < 1.0


def test_an_unfamiliar_photo_holds_its_people_to_a_stricter_bar() -> None:
    """Evidence that makes a person likely, but not very (0.5 < P < 0.9): people are said in a familiar photo and
    held back in an unfamiliar one."""
    cap = Captioner.load(precision="float32")
    g = cap.grounder
    assert g is not None
    w, bias = person_weights()
    c = int(w.argmax())  # the class that says a person most strongly
    target = 0.7  # P(person) = σ(bias + w_c p_c): the p_c that gives it, the rest on a dog breed of no weight
    p = (torch.logit(torch.tensor(target)) - bias) / w[c]
    assert 0 < p < 1
    logits = torch.full((2, 1000), -30.0)
    none = 151 + int(torch.nonzero(w[151:269] == 0)[0])  # ImageNet's dogs: 151-268
    logits[:, c], logits[:, none] = torch.log(p), torch.log(1 - p)
    assert float(g.evidence(logits).person[0]) == pytest.approx(target, abs=1e-3)
    familiar, unfamiliar = g.plans(logits, torch.tensor([False, True]))
    assert not familiar.hold_people and unfamiliar.hold_people
    assert [pl.hold_people for pl in g.plans(logits)] == [False, False]  # no familiarity: the word rule alone


def test_an_unfamiliar_photo_holds_back_the_objects_its_evidence_does_not_see() -> None:
    """A photo the head sees as a golden retriever on a bench: in an unfamiliar photo every COCO object it gives
    next to nothing (a car, a pizza) is held back, what it sees (the bench) is not; a familiar photo holds back only
    the decoder's habitual words."""
    cap = Captioner.load(precision="float32")
    g = cap.grounder
    assert g is not None
    logits = torch.full((2, 1000), -30.0)
    logits[:, 207], logits[:, 703] = 0.0, 0.0  # golden retriever, park bench: half the evidence each
    familiar, unfamiliar = g.plans(logits, torch.tensor([False, True]))
    assert {"car", "pizza", "stove", "bus"} <= set(unfamiliar.hold) and not {"bench", "dog"} & set(unfamiliar.hold)
    assert not {"car", "pizza", "stove", "bus"} & set(familiar.hold)
    assert set(unfamiliar.hold) - set(familiar.hold) <= set(g.objects)
    car = g.tokens["car"]
    assert set(car) <= set(g.banned(unfamiliar)) and not set(car) & set(g.banned(familiar))
