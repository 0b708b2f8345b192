"""Grounded captions: constrained beam search, held-back words, new words, and the shipped model on real photos.

Real forward passes of the shipped model and its encoder on the redistributable example photos; no mocks.
"""

from __future__ import annotations

import pytest
import torch

from capcli.caption import Captioner
from capcli.grounding import Grounder, GroundingPolicy, fix_articles
from capcli.models.decoding import Constraints, beam_search

BANNED = (0, 1, 3)  # <pad>, <start>, <unk>


@pytest.fixture(scope="module")
def plain() -> Captioner:
    return Captioner.load(precision="float32", grounding="off")


@pytest.fixture(scope="module")
def grounded() -> Captioner:
    return Captioner.load(precision="float32")


@pytest.fixture(scope="module")
def grids(plain, example_photos) -> torch.Tensor:
    images = torch.stack([plain.spec.read(p) for p in example_photos])
    with torch.inference_mode():
        return plain.encoder(images)  # (5, 49, 1280)


def _search(cap: Captioner, grids: torch.Tensor, constraints: Constraints | None = None, beam: int = 3):
    v = cap.vocab
    return beam_search(cap.model, grids, v.start_id, v.end_id, beam_size=beam, max_len=20, banned=BANNED,
                       constraints=constraints)


def test_constrained_search_says_every_forced_word(plain, grids) -> None:
    v, B = plain.vocab, grids.size(0)
    for words in (["elephant"], ["pizza"], ["umbrella", "red"]):
        cons = Constraints.of([[[v.index(w)] for w in words]] * B)
        for hyps in _search(plain, grids, cons):
            for w in words:
                assert v.index(w) in hyps[0].tokens, (words, v.to_text(hyps[0].tokens))


def test_a_constraint_is_met_by_any_of_its_words(plain, grids) -> None:
    v, B = plain.vocab, grids.size(0)
    forms = [v.index("dog"), v.index("dogs")]
    cons = Constraints.of([[forms]] * B)
    for hyps in _search(plain, grids, cons, beam=2):
        assert set(forms) & set(hyps[0].tokens)


def test_without_constraints_the_search_is_todays(plain, grids) -> None:
    want = _search(plain, grids)
    for cons in (None, Constraints.of([[]] * grids.size(0))):
        got = _search(plain, grids, cons)
        assert [h[0].tokens for h in got] == [h[0].tokens for h in want]
        assert [h[0].logprob for h in got] == [h[0].logprob for h in want]
    # An image with no constraint shares a batch with constrained ones and keeps its own caption.
    v = plain.vocab
    mixed = Constraints.of([[[v.index("elephant")]] if i % 2 else [] for i in range(grids.size(0))])
    got = _search(plain, grids, mixed)
    for i in range(0, grids.size(0), 2):
        assert got[i][0].tokens == want[i][0].tokens
        assert got[i][0].logprob == pytest.approx(want[i][0].logprob, abs=1e-4)


def test_a_held_back_word_never_appears(plain, grids, example_photos) -> None:
    v, B = plain.vocab, grids.size(0)
    held = [v.index(w) for w in ("dog", "dogs", "man", "men", "a")]
    before = _search(plain, grids)
    assert any(set(held) & set(h[0].tokens) for h in before)  # the plain captions do use them
    after = _search(plain, grids, Constraints.of([[]] * B, [held] * B, len(v)))
    for hyps in after:
        assert not set(held) & set(hyps[0].tokens), v.to_text(hyps[0].tokens)
        assert hyps[0].tokens  # still a caption


def test_grounding_off_is_the_plain_captioner(plain, example_photos) -> None:
    recs = list(plain.caption_paths(example_photos, beam_size=3))
    assert all("labels" not in r for r in recs)
    assert plain.grounder is None


def test_the_shipped_model_names_the_cat_the_coffee_and_the_rocket(grounded, plain, example_photos) -> None:
    recs = {p.name: r for p, r in zip(example_photos, grounded.caption_paths(example_photos, beam_size=3),
                                      strict=True)}
    before = {p.name: r for p, r in zip(example_photos, plain.caption_paths(example_photos, beam_size=3),
                                        strict=True)}
    assert "cat" not in before["chelsea.jpg"]["caption"].split()  # "a brown dog is playing in the grass"
    assert "cat" in recs["chelsea.jpg"]["caption"].split()
    assert "dog" not in recs["chelsea.jpg"]["caption"].split()
    assert {"coffee", "cup"} & set(recs["coffee.jpg"]["caption"].split())
    assert "rocket" in recs["rocket.jpg"]["caption"].split()
    top = recs["chelsea.jpg"]["labels"][0]
    assert top["word"] == "cat" and top["p"] > 0.9
    assert all(0 < lab["p"] <= 1 for r in recs.values() for lab in r["labels"])


def test_words_the_captions_never_taught_start_as_their_relative(plain, grids) -> None:
    assert "zebra" not in plain.vocab
    grounder, model, vocab = Grounder.for_model(plain.model, plain.vocab, "efficientnet-lite0")
    z = vocab.index("zebra")
    info = grounder.table.words["zebra"]
    rel = vocab.index(next(r for r in info.relatives if r in plain.vocab))
    assert z >= len(plain.vocab) and "zebra" in grounder.novel
    torch.testing.assert_close(model.embed.weight[z], model.embed.weight[rel])
    torch.testing.assert_close(model.L_o.weight[z], model.L_o.weight[rel])
    # The old words keep their weights, and the grown model can be made to say the new word.
    torch.testing.assert_close(model.L_o.weight[: len(plain.vocab)], plain.model.L_o.weight)
    out = beam_search(model, grids, vocab.start_id, vocab.end_id, beam_size=3, banned=BANNED,
                      constraints=Constraints.of([[[z]]] * grids.size(0)))
    assert all(z in h[0].tokens for h in out)


def test_novel_words_are_never_said_unless_asked(grounded) -> None:
    g = grounded.grounder
    assert g is not None and g.novel
    plan = g.plans(torch.zeros(1, 1000), torch.zeros(1, 1280))[0]
    banned = set(g.banned(plan))
    assert all(set(g.tokens[w]) <= banned for w in g.novel)


def test_plans_follow_the_evidence(grounded) -> None:
    g = grounded.grounder
    assert g is not None
    logits = torch.full((2, 1000), -10.0)
    logits[0, 385] = logits[0, 386] = 10.0  # Indian and African elephant: "elephant", no dog at all
    logits[1, 207] = 10.0  # golden retriever
    plans = g.plans(logits, torch.zeros(2, 1280))
    assert plans[0].say == ["elephant"] and "dog" in plans[0].hold
    assert plans[1].say == ["dog"] and "dog" not in plans[1].hold
    assert plans[0].labels[0] == ("elephant", 1.0)
    strict = Grounder(g.table, g.vocab, None, GroundingPolicy(say=1.01))
    assert strict.plans(logits, torch.zeros(2, 1280))[0].say == []


def test_articles_follow_the_next_word() -> None:
    assert fix_articles(["a", "elephant", "and", "an", "dog", "on", "a", "unicycle"]) == \
        ["an", "elephant", "and", "a", "dog", "on", "a", "unicycle"]
    assert fix_articles(["a"]) == ["a"]
