"""Tokenisation and vocabulary: the one place where text becomes token ids and back.

The tokenizer follows the COCO caption toolkit's PTBTokenizer as pycocoevalcap runs it
(Stanford PTBTokenizer with ``-lowerCase``, then dropping punctuation tokens), so the tokens a model
is trained on are the tokens the metrics count: lower case, clitics split (``dog's`` -> ``dog 's``,
``don't`` -> ``do n't``), hyphenated words kept whole (``t-shirt``), punctuation removed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import CapcliError

# The tokens pycocoevalcap's PTBTokenizer drops after tokenising.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Separators; a comma or colon between digits stays inside the token ("100,000", "9:30"), as in PTB.
_SPLIT = re.compile(r"(?:[\s;!?()\[\]{}\"]|(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d))+|\.\.\.|--")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_EDGE = "'`-."
_CLITICS = frozenset(["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"])
# Words PTB splits in two, and abbreviations / initialisms whose final period PTB keeps ("mr.", "d.c.").
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_ACRONYM = re.compile(r"^(?:[a-z]\.)+$")
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "jr.", "sr.", "st.", "mt.", "vs.", "prof.", "capt.", "sgt."])


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case word tokens the way the COCO toolkit's PTBTokenizer does."""
    tokens: list[str] = []
    for raw in _SPLIT.split(text.lower()):
        if raw in _CLITICS:  # already split off, as in "dog 's"
            tokens.append(raw)
            continue
        dotted = raw.strip("'`-")
        if _ACRONYM.match(dotted) or dotted in _ABBREVIATIONS:
            tokens.append(dotted)
            continue
        word = raw.strip(_EDGE)
        if not word:
            continue
        if word in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[word])
            continue
        clitics: list[str] = []
        while (m := _CLITIC.match(word)) and m.group(1).strip(_EDGE):  # "x'd'd" -> x 'd 'd: stable on re-tokenising
            word = m.group(1).strip(_EDGE)
            clitics.insert(0, m.group(2))
        if clitics or word not in PUNCTUATION:
            tokens.append(word)
            tokens.extend(clitics)
    return tokens


class Vocabulary:
    """Word <-> id mapping with the four special tokens at fixed ids 0..3."""

    PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
    SPECIALS = (PAD, START, END, UNK)
    FORMAT = "capcli-vocab/1"

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        words = list(words)
        if tuple(words[:4]) != self.SPECIALS:
            words = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.words: list[str] = words
        self.min_count = min_count
        self._index = {w: i for i, w in enumerate(words)}
        if len(self._index) != len(words):
            raise CapcliError("vocabulary has duplicate words")

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_size: int | None = None) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for c in captions for tok in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(cls.SPECIALS))]
        return cls(list(cls.SPECIALS) + kept, min_count=min_count)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def index(self, word: str) -> int:
        return self._index.get(word, self.unk_id)

    def encode(self, caption: str | Sequence[str], add_special: bool = True) -> list[int]:
        """Token ids for a caption (a string is tokenised first), wrapped in <start> ... <end>."""
        tokens = tokenize(caption) if isinstance(caption, str) else caption
        ids = [self.index(t) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words for ids, stopping at <end> and skipping <start>/<pad>."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.words[i])
        return out

    def to_text(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode(ids))

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "min_count": self.min_count, "words": self.words}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        if d.get("format") != cls.FORMAT or not isinstance(d.get("words"), list):
            raise CapcliError("not a capcli vocabulary (expected format capcli-vocab/1)")
        return cls(d["words"], min_count=int(d.get("min_count", 1)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CapcliError(f"cannot read vocabulary {path}: {e}") from e
