"""CHAIR: how often captions name objects that are not in the photo (Rohrbach et al., EMNLP 2018,
"Object Hallucination in Image Captioning").

Objects are the 80 COCO object categories. ``assets/coco-objects.json`` (capcli's own table) lists, per
category, the words and phrases that name it, in the singular: ``person`` is named by man, woman, boy,
girl, child, people, player, skier, rider, ...; ``dog`` by dog, puppy, terrier, ...; ``bicycle`` by bike
and bicycle, ``motorcycle`` by motorbike and dirt bike, ``dining table`` by table, ``tv`` by television.

How a caption's objects are found (:func:`objects_in`):

- Words: :func:`capcli.vocab.tokenize` (lower case, punctuation dropped, the tokens the metrics see),
  then hyphenated and slashed words are split (``dirt-bike`` -> ``dirt bike``).
- Plurals: each synonym also matches its plural: the table's ``irregular_plurals`` (men, children, mice,
  knives, sheep, ...) else the English rules (bus -> buses, puppy -> puppies, dog -> dogs); a phrase
  pluralises its last word (``hot dogs``), or the word before ``of`` (``glasses of wine``).
- Longest phrase first, left to right, each word used once: ``hot dog`` is a hot dog and never a dog,
  ``teddy bear`` never a bear, ``baseball bat`` a bat and not a ball, ``dirt bike`` a motorcycle and not a
  bicycle, ``pit bull`` a dog and not a cow. ``not_objects`` are phrases that name no object and so hide
  their words: ``prairie dog``, ``ball cap``, ``cd player``, ``chair lift``, ``flower bed``, ...
- Words that are often modifiers count only as the head of a noun phrase (``head_only``: the next word
  is absent or a preposition, conjunction or auxiliary from ``function_words``, and not ``and``/``or``
  before a colour): ``kicks a football .`` is a ball, ``a football player`` is not. ``orange`` must also
  follow a determiner (``an orange .``, not ``a man in orange``); ``oranges`` always counts.
- ``baby``, ``adult``, ``mother``, ... directly before an animal (``baby elephant``) do not name a person.

For each image the ground truth is the union of the objects of all its reference captions; a caption's
object set is the categories it names (each counted once per caption); the hallucinated objects are
those of the caption that are not in the ground truth. Over all captions:

- ``CHAIR_i`` = hallucinated objects / objects mentioned (both summed over captions), in percent;
- ``CHAIR_s`` = captions with at least one hallucinated object / captions, in percent.

Lower is better. Unlike the paper, the ground truth here comes from the reference captions only (no
segmentation labels), so an object in the photo that no reference names counts as hallucinated.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CapcliError, EvaluateError
from .vocab import tokenize

TABLE_PATH = Path(__file__).resolve().parent / "assets" / "coco-objects.json"
_SUBSPLIT = re.compile(r"[-/]+")


@dataclass(frozen=True)
class _Entry:
    """What a surface phrase names: ``category`` (None for a not-object phrase) and its singular form."""

    category: str | None
    singular: tuple[str, ...]
    is_plural: bool


@dataclass(frozen=True)
class ObjectTable:
    """The synonym table, indexed for matching (see the module docstring for each part's role)."""

    phrases: dict[tuple[str, ...], _Entry]
    categories: tuple[str, ...]
    longest: int
    head_only: frozenset[tuple[str, ...]]
    needs_determiner: frozenset[tuple[str, ...]]
    animal_modifiers: frozenset[tuple[str, ...]]
    animal_categories: frozenset[str]
    determiners: frozenset[str]
    function_words: frozenset[str]
    colours: frozenset[str]


def plural(phrase: tuple[str, ...], irregular: Mapping[str, str]) -> tuple[str, ...]:
    """The plural of a singular phrase: its last word, or the word before ``of``, made plural."""
    at = phrase.index("of") - 1 if "of" in phrase[1:] else len(phrase) - 1
    word = phrase[at]
    if word in irregular:
        many = irregular[word]
    elif word.endswith(("s", "x", "z", "ch", "sh")):
        many = word + "es"
    elif word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        many = word[:-1] + "ies"
    else:
        many = word + "s"
    return (*phrase[:at], many, *phrase[at + 1:])


def _add(phrases: dict[tuple[str, ...], _Entry], surface: tuple[str, ...], entry: _Entry) -> None:
    old = phrases.get(surface)
    if old is not None and old.category != entry.category:
        raise CapcliError(
            f"object table: {' '.join(surface)!r} names both {old.category!r} and {entry.category!r}"
        )
    if old is None or (old.is_plural and not entry.is_plural):  # "sheep": the singular entry wins
        phrases[surface] = entry


def build_table(doc: Mapping[str, Any]) -> ObjectTable:
    """Index a table document (the shape of ``assets/coco-objects.json``)."""
    irregular = dict(doc.get("irregular_plurals", {}))
    phrases: dict[tuple[str, ...], _Entry] = {}
    named: list[tuple[str | None, str]] = [(c, s) for c, syns in doc["categories"].items() for s in syns]
    named += [(None, s) for s in doc.get("not_objects", [])]
    for category, text in named:
        one = tuple(text.lower().split())
        _add(phrases, one, _Entry(category, one, False))
        _add(phrases, plural(one, irregular), _Entry(category, one, True))

    def tuples(key: str) -> frozenset[tuple[str, ...]]:
        return frozenset(tuple(s.split()) for s in doc.get(key, []))

    return ObjectTable(
        phrases=phrases,
        categories=tuple(doc["categories"]),
        longest=max(len(p) for p in phrases),
        head_only=tuples("head_only"),
        needs_determiner=tuples("needs_determiner"),
        animal_modifiers=tuples("animal_modifiers"),
        animal_categories=frozenset(doc.get("animal_categories", [])),
        determiners=frozenset(doc.get("determiners", [])),
        function_words=frozenset(doc.get("function_words", [])),
        colours=frozenset(doc.get("colours", [])),
    )


@functools.cache
def default_table() -> ObjectTable:
    """capcli's table of the 80 COCO categories (``assets/coco-objects.json``)."""
    return build_table(json.loads(TABLE_PATH.read_text(encoding="utf-8")))


def words(caption: str) -> list[str]:
    """The caption's tokens as :func:`capcli.vocab.tokenize` gives them, hyphenated words split."""
    return [w for token in tokenize(caption) for w in _SUBSPLIT.split(token) if w]


def _longest(tokens: Sequence[str], i: int, table: ObjectTable) -> tuple[int, _Entry] | None:
    for n in range(min(table.longest, len(tokens) - i), 0, -1):
        entry = table.phrases.get(tuple(tokens[i:i + n]))
        if entry is not None:
            return n, entry
    return None


def _counts(tokens: Sequence[str], i: int, n: int, entry: _Entry, table: ObjectTable) -> bool:
    """Whether the phrase ``tokens[i:i+n]`` names its object here (the modifier rules)."""
    after = tokens[i + n] if i + n < len(tokens) else None
    if not entry.is_plural and entry.singular in table.head_only and after is not None:
        if after not in table.function_words:
            return False
        if after in ("and", "or") and i + n + 1 < len(tokens) and tokens[i + n + 1] in table.colours:
            return False
    if not entry.is_plural and entry.singular in table.needs_determiner and (
        i == 0 or tokens[i - 1] not in table.determiners
    ):
        return False
    if entry.singular in table.animal_modifiers:
        nxt = _longest(tokens, i + n, table)
        if nxt is not None and nxt[1].category in table.animal_categories:
            return False
    return True


def objects_in(caption: str, table: ObjectTable | None = None) -> set[str]:
    """The COCO categories a caption names (see the module docstring for the matching rules)."""
    table = table or default_table()
    tokens = words(caption)
    found: set[str] = set()
    i = 0
    while i < len(tokens):
        hit = _longest(tokens, i, table)
        if hit is None:
            i += 1
            continue
        n, entry = hit
        if entry.category is not None and _counts(tokens, i, n, entry, table):
            found.add(entry.category)
        i += n
    return found


@dataclass
class ImageChair:
    """One caption's objects (``mentioned``), the references' union (``truth``) and the difference."""

    mentioned: list[str]
    truth: list[str]
    hallucinated: list[str]


@dataclass
class ChairScores:
    """CHAIR over a set of captions. ``chair_s``, ``chair_i`` in percent (lower is better); ``chair_i``
    is None when no caption names any object."""

    chair_s: float
    chair_i: float | None
    captions: int
    captions_hallucinating: int
    mentioned: int
    hallucinated: int
    top_hallucinated: list[tuple[str, int]] = field(default_factory=list)
    per_image: dict[int, ImageChair] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``chair`` block of the metrics JSON; per image only the captions that hallucinate."""
        return {
            "CHAIR_s": self.chair_s,
            "CHAIR_i": self.chair_i,
            "unit": "percent",
            "captions": self.captions,
            "captions_hallucinating": self.captions_hallucinating,
            "objects_mentioned": self.mentioned,
            "objects_hallucinated": self.hallucinated,
            "top_hallucinated": [{"object": c, "count": n} for c, n in self.top_hallucinated],
            "hallucinated": {str(i): r.hallucinated for i, r in self.per_image.items() if r.hallucinated},
        }


def chair(
    captions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    top: int = 10,
    table: ObjectTable | None = None,
) -> ChairScores:
    """CHAIR_s and CHAIR_i of one caption per image against the objects its references name.

    ``references`` must cover every caption's image id (EvaluateError otherwise). ``top``: how many of
    the most often hallucinated categories to keep (ties in name order).
    """
    table = table or default_table()
    if not captions:
        raise EvaluateError("no captions to score")
    per: dict[int, ImageChair] = {}
    for i in sorted(captions):
        refs = references.get(i)
        if not refs:
            raise EvaluateError(f"image {i} has no reference captions to score against")
        truth: set[str] = set().union(*(objects_in(r, table) for r in refs))
        said = objects_in(captions[i], table)
        per[i] = ImageChair(sorted(said), sorted(truth), sorted(said - truth))
    mentioned = sum(len(r.mentioned) for r in per.values())
    hallucinated = sum(len(r.hallucinated) for r in per.values())
    bad = sum(1 for r in per.values() if r.hallucinated)
    counts = Counter(c for r in per.values() for c in r.hallucinated)
    return ChairScores(
        chair_s=100.0 * bad / len(per),
        chair_i=100.0 * hallucinated / mentioned if mentioned else None,
        captions=len(per),
        captions_hallucinating=bad,
        mentioned=mentioned,
        hallucinated=hallucinated,
        top_hallucinated=sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top],
        per_image=per,
    )
