"""The ImageNet word table: which caption word each of the encoder head's 1000 ImageNet-1k classes stands for.

``capcli/assets/imagenet-words.json`` is built from WordNet 3.0 by ``scripts/build_imagenet_words.py`` (captioning
needs no WordNet). For grounded captions, the Lite0 head's class probabilities are summed per word: tabby, tiger cat
and Egyptian cat are all evidence for "cat"; every dog breed for "dog". Each word also carries its plural forms (to
match caption tokens) and its nearest WordNet relatives in the shipped vocabulary, best first, to initialise the
embedding of a word the model never learned (DCC, Hendricks et al. 2016).

Torch-free: numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .errors import GroundingError

TABLE_PATH = Path(__file__).resolve().parent / "assets" / "imagenet-words.json"
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ClassEntry:
    """One ImageNet-1k class: ``word`` is None when no caption word fits (``reason`` says why)."""

    index: int
    wnid: str
    name: str
    word: str | None
    reason: str | None = None


@dataclass(frozen=True)
class WordInfo:
    word: str
    plurals: tuple[str, ...]  # plural forms, e.g. ("elephants",); empty for words already plural ("jeans")
    relatives: tuple[str, ...]  # up to 5 shipped-vocabulary nouns, nearest first; the word itself first if learned
    in_vocab: bool  # whether the shipped model's vocabulary has the word
    sense: str  # the WordNet 3.0 synset the relatives were measured from, e.g. "cat.n.01"

    @property
    def forms(self) -> tuple[str, ...]:
        """Every caption token that names this word: the word and its plurals."""
        return (self.word, *self.plurals)


@dataclass(frozen=True)
class WordTable:
    classes: tuple[ClassEntry, ...]  # in class-index order, as the head's logits
    class_words: tuple[str | None, ...]  # classes[i].word
    words: Mapping[str, WordInfo]  # every word some class uses
    person_classes: frozenset[int]  # classes whose presence implies a person (worn clothing, groom, diver...)
    meta: Mapping[str, object]

    def classes_of(self, word: str) -> list[int]:
        """The class indices that count as evidence for ``word`` (empty if no class maps to it)."""
        return [c.index for c in self.classes if c.word == word]

    def class_to_word_matrix(self, vocab_words: Iterable[str] | None = None) -> tuple[list[str], list[np.ndarray]]:
        """The table's words (sorted) and, for each, the int64 array of its class indices.

        With ``vocab_words``, only words the caller can use are kept: a word is kept when it or one of its plurals
        is in ``vocab_words``. Summing ``probs[..., idx]`` over each array gives per-word evidence.
        """
        keep = None if vocab_words is None else set(vocab_words)
        by_word: dict[str, list[int]] = {}
        for c in self.classes:
            if c.word is not None:
                by_word.setdefault(c.word, []).append(c.index)
        names = sorted(w for w in by_word if keep is None or keep.intersection(self.words[w].forms))
        return names, [np.asarray(by_word[w], dtype=np.int64) for w in names]

    def word_evidence(self, probs: np.ndarray, vocab_words: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Class probabilities (..., 1000) summed per word: word -> array of shape (...), most evidence first."""
        probs = np.asarray(probs)
        if probs.shape[-1] != NUM_CLASSES:
            raise GroundingError(f"expected {NUM_CLASSES} ImageNet class probabilities, got shape {probs.shape}")
        names, indices = self.class_to_word_matrix(vocab_words)
        sums = {w: probs[..., idx].sum(-1) for w, idx in zip(names, indices, strict=True)}
        return dict(sorted(sums.items(), key=lambda kv: -float(np.max(kv[1]))))


def parse_word_table(data: dict) -> WordTable:
    """A WordTable from the JSON's dict; GroundingError if it is not a complete table."""
    try:
        classes = tuple(ClassEntry(int(c["index"]), c["wnid"], c["name"], c["word"], c.get("reason"))
                        for c in data["classes"])
        words = {w: WordInfo(w, tuple(v["plurals"]), tuple(v["relatives"]), bool(v["in_vocab"]), v["sense"])
                 for w, v in data["words"].items()}
        persons = frozenset(int(i) for i in data["person_classes"])
        meta = dict(data.get("meta", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise GroundingError(f"ImageNet word table is malformed ({type(e).__name__}: {e})") from e
    if [c.index for c in classes] != list(range(NUM_CLASSES)):
        raise GroundingError(f"ImageNet word table must list classes 0..{NUM_CLASSES - 1} in order")
    missing = sorted({c.word for c in classes if c.word is not None} - words.keys())
    if missing:
        raise GroundingError(f"ImageNet word table has no entry for word(s) {', '.join(missing[:5])}")
    return WordTable(classes, tuple(c.word for c in classes), MappingProxyType(words), persons,
                     MappingProxyType(meta))


def load_word_table(path: str | Path | None = None) -> WordTable:
    """The shipped table (or the one at ``path``), parsed once per path."""
    return _load(str(Path(path) if path is not None else TABLE_PATH))


@lru_cache(maxsize=4)
def _load(path: str) -> WordTable:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GroundingError(f"ImageNet word table not found: {path}") from None
    except (OSError, ValueError) as e:
        raise GroundingError(f"cannot read ImageNet word table {path}: {e}") from e
    if not isinstance(data, dict):
        raise GroundingError(f"ImageNet word table {path} is not a JSON object")
    return parse_word_table(data)
