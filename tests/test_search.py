"""SearchOptions (the caption search's options, checked once) and the one search that captioning, training's
validation and SCST share: real models over the shipped models' vocabulary of real Flickr8k captions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from capcli.captioner import SHIPPED_MODELS
from capcli.checkpoint import load_checkpoint
from capcli.config import TrainConfig
from capcli.errors import UsageError
from capcli.models import build
from capcli.progress import NULL
from capcli.search import SearchOptions, search
from capcli.train.loop import _generate
from capcli.vocab import Vocabulary


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_dict(load_checkpoint(SHIPPED_MODELS["basic"])["vocab"])


@pytest.mark.parametrize(("options", "message"), [
    ({"beam_size": 0}, "--beam must be at least 1"),
    ({"beam_size": 3, "top_k": 4}, "--top-k 4 needs --beam >= 4 (it is 3)"),
    ({"top_k": 0}, "--top-k 0 needs --beam >= 0 (it is 3)"),
    ({"max_len": 0}, "--max-len 0: give a number of words from 1 to 100"),
    ({"max_len": 101}, "--max-len 101: give a number of words from 1 to 100"),
    ({"length_penalty": -0.5}, "--length-penalty -0.5: give a number from 0 to 5"),
    ({"length_penalty": math.nan}, "--length-penalty nan: give a number from 0 to 5"),
    ({"beam_size": 1290}, "--beam 1290 is too large for a vocabulary of 2578 words"),
])
def test_options_are_checked_when_made(vocab, options, message) -> None:
    with pytest.raises(UsageError) as e:
        SearchOptions.of(vocab, **options)
    assert str(e.value) == message


def test_options_come_from_the_vocabulary_and_stay_as_made(vocab) -> None:
    opts = SearchOptions.of(vocab, beam_size=1289, max_len=100, top_k=1289, length_penalty=5.0)  # the limits
    assert (opts.start_id, opts.end_id, opts.vocab_size) == (vocab.start_id, vocab.end_id, 2578)
    assert opts.banned == (vocab.pad_id, vocab.start_id, vocab.unk_id)  # alt-text never says "<unk>"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beam_size = 3  # type: ignore[misc]
    with pytest.raises(UsageError, match="--max-len 101"):
        dataclasses.replace(opts, max_len=101)  # a changed copy is checked again


@pytest.fixture(scope="module")
def unk_model(vocab):
    """A real (seeded, random) Show and Tell whose likeliest word is always <unk>: what an early epoch says."""
    torch.manual_seed(0)
    model = build({"arch": "basic", "vocab_size": len(vocab), "feature_dim": 16, "embed_dim": 32,
                   "hidden_dim": 32}).eval()
    with torch.no_grad():
        model.out.bias[vocab.unk_id] = 50.0
    return model


@pytest.mark.parametrize("beam", [1, 3])
def test_validation_searches_as_caption_does_no_unk(vocab, unk_model, beam) -> None:
    """Validation (``loop._generate``, which picks best.pt) bans the specials as ``capcli caption``/``evaluate``
    do: it scored captions full of "<unk>" that those never write."""
    feats = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    groups = list(torch.arange(6).split(4))
    cfg = TrainConfig(val_beam=beam, max_len=6)
    hyps = _generate(unk_model, iter([(feats[g], None, []) for g in groups]), groups, list(range(100, 106)), vocab,
                     cfg, torch.device("cpu"), None, NULL)
    want = [vocab.to_text(h[0].tokens) for h in search(unk_model, feats, SearchOptions.of(vocab, beam, 6))]
    assert [hyps[i] for i in range(100, 106)] == want
    assert not any("<unk>" in h.split() for h in want)
