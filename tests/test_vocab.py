"""Tokenizer and vocabulary: property tests, and agreement with the COCO toolkit's Java PTBTokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capcli.errors import CapcliError
from capcli.vocab import Vocabulary, tokenize

WORD = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True).filter(lambda w: tokenize(w) == [w])  # e.g. not "cannot"
WORDS = st.lists(WORD, min_size=1, max_size=30, unique=True)


# ---- tokenizer: hand-picked cases (expected tokens are what pycocoevalcap's PTBTokenizer produces) ----------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A dog's ball.", ["a", "dog", "'s", "ball"]),
        ("A dog 's ball .", ["a", "dog", "'s", "ball"]),
        ("Don't do that!", ["do", "n't", "do", "that"]),
        ("do n't", ["do", "n't"]),
        ("I can't, won't", ["i", "ca", "n't", "wo", "n't"]),
        ("he'd they're we've I'm you'll", ["he", "'d", "they", "'re", "we", "'ve", "i", "'m", "you", "'ll"]),
        ("it's the dogs' toys", ["it", "'s", "the", "dogs", "toys"]),
        ("A man in a T-shirt, jumping.", ["a", "man", "in", "a", "t-shirt", "jumping"]),
        ("rock-n-roll cut-outs", ["rock-n-roll", "cut-outs"]),
        ("Two dogs...playing; a man--running: fast?!", ["two", "dogs", "playing", "a", "man", "running", "fast"]),
        ("The 'big' \"quoted\" dog", ["the", "big", "quoted", "dog"]),
        ("We cannot see", ["we", "can", "not", "see"]),
        ("gonna wanna gotta", ["gon", "na", "wan", "na", "got", "ta"]),
        ("Mr. Potato Head in Washington D.C.", ["mr.", "potato", "head", "in", "washington", "d.c."]),
        ("A U.S. flag at 9:30 for 100,000 people", ["a", "u.s.", "flag", "at", "9:30", "for", "100,000", "people"]),
        ("3.5 miles o'clock", ["3.5", "miles", "o'clock"]),
        ("a dog runs.", ["a", "dog", "runs"]),
        ("  \t ", []),
        ("", []),
        ("! . , ; : -- ...", []),
    ],
)
def test_tokenize_hand_picked(text: str, expected: list[str]) -> None:
    assert tokenize(text) == expected


# any text, and text made of the characters the tokenizer treats specially
SPECIAL = st.sampled_from(list("adnostv'`.,:;-!?()[]{}\"01 \t"))
TEXT = st.one_of(st.text(max_size=80), st.text(alphabet=SPECIAL, max_size=40))


@given(TEXT)
@settings(max_examples=300, deadline=None)
def test_tokenize_total_and_normalised(text: str) -> None:
    """Any text tokenises without error into non-empty, space-free, lower-case tokens, idempotently."""
    tokens = tokenize(text)
    for t in tokens:
        assert t and not any(c.isspace() for c in t)
        assert t == t.lower()
    assert tokenize(" ".join(tokens)) == tokens


@pytest.fixture(scope="module")
def flickr_captions(flickr8k_dir) -> list[str]:
    doc = json.loads((flickr8k_dir / "captions.json").read_text())
    # Every 17th caption: 2000+ captions spread over the whole set, not just its first images.
    return [a["caption"] for a in doc["annotations"][::17]][:2100]


@pytest.fixture(scope="module")
def coco_captions(coco_mini_dir) -> list[str]:
    ann = coco_mini_dir / "annotations"
    docs = [json.loads((ann / f"captions_{s}2017.json").read_text()) for s in ("train", "val")]
    return [a["caption"] for d in docs for a in d["annotations"]]


def test_tokenizer_agrees_with_java_ptbtokenizer(flickr_captions, coco_captions) -> None:
    if shutil.which("java") is None:
        pytest.skip("java is not installed (pycocoevalcap's PTBTokenizer needs it)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    extra = ["We cannot see the face .", "A boy in Washington D.C.", "Mr. Potato Head , 100,000 dogs at 9:30 ."]
    captions = flickr_captions + coco_captions + extra
    ref = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    same = [ref[i][0].split() == tokenize(c) for i, c in enumerate(captions)]
    assert len(flickr_captions) >= 2000 and len(coco_captions) > 700
    assert all(same[-len(extra):]), [c for c, s in zip(captions, same, strict=True) if not s]
    n = len(flickr_captions)
    for name, part in (("Flickr8k", same[:n]), ("COCO", same[n : -len(extra)])):
        rate = sum(part) / len(part)
        assert rate >= 0.995, f"only {rate:.4f} of {name} captions tokenise as the Java PTBTokenizer does"


# ---- vocabulary ----------------------------------------------------------------------------------------
def test_specials_at_fixed_ids() -> None:
    v = Vocabulary.build(["a dog", "a cat"], min_count=1)
    assert v.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert [v.index(w) for w in Vocabulary.SPECIALS] == [0, 1, 2, 3]
    # "a" is the most frequent word: first after the specials; ties are alphabetical
    assert v.words[4:] == ["a", "cat", "dog"]
    # words given without specials get them prepended
    assert Vocabulary(["x", "y"]).words == ["<pad>", "<start>", "<end>", "<unk>", "x", "y"]


@given(words=WORDS, data=st.data())
@settings(max_examples=100, deadline=None)
def test_encode_decode_round_trip(words: list[str], data) -> None:
    v = Vocabulary(words)
    sentence = data.draw(st.lists(st.sampled_from(words), max_size=20))
    ids = v.encode(sentence)
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.unk_id not in ids
    assert v.decode(ids) == sentence
    assert v.encode(" ".join(sentence)) == ids  # string path tokenises to the same tokens
    assert v.to_text(ids) == " ".join(sentence)
    assert v.encode(sentence, add_special=False) == ids[1:-1]


@given(words=WORDS, unknown=st.lists(WORD, min_size=1, max_size=5))
@settings(max_examples=100, deadline=None)
def test_unknown_words_map_to_unk(words: list[str], unknown: list[str]) -> None:
    v = Vocabulary(words)
    unknown = [u for u in unknown if u not in words]
    ids = v.encode(unknown, add_special=False)
    assert ids == [v.unk_id] * len(unknown)
    assert v.decode(ids) == ["<unk>"] * len(unknown)
    assert all(u not in v for u in unknown)


@given(words=WORDS, data=st.data())
@settings(max_examples=100, deadline=None)
def test_decode_stops_at_end_and_skips_start_and_pad(words: list[str], data) -> None:
    v = Vocabulary(words)
    ids = data.draw(st.lists(st.integers(0, len(v) - 1), max_size=30))
    out = v.decode(ids)
    expected = []
    for i in ids:
        if i == v.end_id:
            break
        if i not in (v.pad_id, v.start_id):
            expected.append(v.words[i])
    assert out == expected
    assert "<end>" not in out and "<start>" not in out and "<pad>" not in out
    assert v.decode([v.start_id, v.pad_id, v.end_id, v.index(words[0])]) == []


@given(captions=st.lists(st.lists(WORD, max_size=8).map(" ".join), max_size=40), min_count=st.integers(1, 4))
@settings(max_examples=100, deadline=None)
def test_build_min_count_cut_off(captions: list[str], min_count: int) -> None:
    from collections import Counter

    counts = Counter(t for c in captions for t in tokenize(c))
    v = Vocabulary.build(captions, min_count=min_count)
    assert set(v.words[4:]) == {w for w, n in counts.items() if n >= min_count}
    freqs = [counts[w] for w in v.words[4:]]
    assert freqs == sorted(freqs, reverse=True)  # most frequent first
    assert v.min_count == min_count
    small = Vocabulary.build(captions, min_count=min_count, max_size=6)
    assert len(small) <= 6 and small.words == v.words[: len(small)]


@given(words=WORDS, min_count=st.integers(1, 10))
@settings(max_examples=100, deadline=None)
def test_dict_round_trip(words: list[str], min_count: int) -> None:
    v = Vocabulary(words, min_count=min_count)
    d = json.loads(json.dumps(v.to_dict()))  # must be JSON-able as well
    w = Vocabulary.from_dict(d)
    assert w.words == v.words and w.min_count == min_count
    assert all(w.index(x) == v.index(x) for x in words)


def test_save_load_round_trip(tmp_path) -> None:
    v = Vocabulary.build(["Ein Hund läuft über die Wiese .", "A dog's ball", "a café"], min_count=1)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w.words == v.words and "über" in w and "café" in w
    assert w.encode("a café") == v.encode("a café")


def test_bad_vocabularies_raise_one_line_errors(tmp_path) -> None:
    with pytest.raises(CapcliError, match="not a capcli vocabulary"):
        Vocabulary.from_dict({"words": ["a"]})
    with pytest.raises(CapcliError, match="duplicate"):
        Vocabulary(["a", "b", "a"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CapcliError, match="cannot read vocabulary") as e:
        Vocabulary.load(tmp_path / "bad.json")
    assert "\n" not in str(e.value)
    with pytest.raises(CapcliError, match="cannot read vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")
