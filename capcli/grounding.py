"""Grounded captions: what the encoder itself recognises steers what the caption may and must say.

A decoder trained on Flickr8k (people and dogs) describes a refrigerator as "a black and white dog", although its
own encoder's ImageNet head recognises the refrigerator. Grounding puts that evidence into the search:

    photo -> encoder -> grid (B, N, D) -> ImageNet head over the pooled grid -> p(class) (B, 1000)
          -> per word: e(w) = Σ_{c -> w} p(c)   (classes -> caption words: assets/imagenet-words.json)
          -> person probability (a probe on the pooled grid, trained on Flickr8k's train captions)
          -> per photo a plan: words to say, words to hold back, labels -> one batched beam search

- **Say it.** A word with evidence >= ``say`` becomes a constraint of the beam search (``decoding.Constraints``:
  one beam set per subset of constraints met, Anderson et al. 2017).
- The plain search runs first; only the photos whose caption breaks their plan (misses a word to say, or says a
  held-back word) are searched again under it, so every other caption stays exactly as it was, and the extra
  beams are spent only where the evidence asks for them.
- **Don't say what is not there.** Words the evidence reliably sees (``hold_words``: dog, bird, ...) are held back
  (never generated) when their evidence is below ``hold``; person words are held back when the person probe gives
  less than ``person_hold``.
- **Words the captions never taught.** A table word missing from the model's vocabulary joins it, its embedding
  and output rows copied from its nearest in-vocabulary WordNet relative (DCC, Hendricks et al. 2016); such a word
  is only ever said as a constraint.
- **Labels.** Each record gets the top words with their evidence, as keywords.

Every threshold was chosen on Flickr8k val (README, "Grounded captions"); none on the out-of-domain photos it is
reported on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import GroundingError
from .grounding_table import WordTable, load_word_table
from .models.base import CaptionModel
from .models.decoding import Constraints
from .vocab import Vocabulary

MODES = ("auto", "off")
_ASSETS = Path(__file__).resolve().parent / "assets"
PERSON_PROBES = {"efficientnet-lite0": _ASSETS / "person-probe-efficientnet-lite0.json"}
# Words that name a person: held back together on the person probe's word (the table has no person class).
_PERSON = (
    "man men woman women boy boys girl girls child children kid kids people person persons player players lady "
    "ladies guy guys baby babies toddler toddlers adult adults teenager teenagers teen teens crowd skier skiers "
    "surfer surfers rider riders biker bikers cyclist cyclists climber climbers swimmer swimmers runner runners "
    "snowboarder snowboarders skateboarder skateboarders dancer dancers worker workers family couple he she "
    "someone gentleman")
PERSON_WORDS = frozenset(_PERSON.split())


@dataclass(frozen=True)
class GroundingPolicy:
    """The thresholds of grounding, on evidence e(w) in [0, 1] (chosen on Flickr8k val)."""

    say: float = 0.5  # a word at least this likely must be in the caption
    max_say: int = 1  # at most this many such words per photo (the likeliest)
    hold: float = 0.01  # the ``hold_words`` less likely than this are held back
    # Words the ImageNet evidence never misses: on Flickr8k val, every word of the table named by the references of
    # at least 5 photos, of which at most 5% have evidence below ``hold`` (dog: 0 of 244).
    hold_words: tuple[str, ...] = ("dog", "bird", "cliff", "canoe", "guitar", "shop", "racket")
    person_hold: float = 0.2  # person words are held back below this person probability
    labels: int = 5  # labels per record
    label_min: float = 0.05  # the least evidence a label needs


@dataclass
class Plan:
    """What grounding asks of one photo's caption."""

    say: list[str] = field(default_factory=list)
    hold: list[str] = field(default_factory=list)
    labels: list[tuple[str, float]] = field(default_factory=list)
    person: float = 0.0


@dataclass(frozen=True)
class PersonProbe:
    """Logistic regression on the pooled grid: p(person) = σ(w · (x - mean) / std + b)."""

    weight: torch.Tensor  # (D,)
    bias: float
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) probabilities."""
        x = (pooled.float() - self.mean.to(pooled.device)) / self.std.to(pooled.device)
        return torch.sigmoid(x @ self.weight.to(pooled.device) + self.bias)

    def to_dict(self, **meta: object) -> dict:
        return {"format": "capcli-person-probe/1", "bias": self.bias, "weight": self.weight.tolist(),
                "mean": self.mean.tolist(), "std": self.std.tolist(), **meta}

    @classmethod
    def from_dict(cls, d: dict) -> PersonProbe:
        if d.get("format") != "capcli-person-probe/1":
            raise GroundingError("not a capcli person probe (expected format capcli-person-probe/1)")
        return cls(torch.tensor(d["weight"]), float(d["bias"]), torch.tensor(d["mean"]), torch.tensor(d["std"]))


@lru_cache(maxsize=4)
def load_person_probe(encoder: str) -> PersonProbe | None:
    """The shipped person probe of ``encoder``, or None where there is none."""
    path = PERSON_PROBES.get(encoder)
    if path is None or not path.is_file():
        return None
    try:
        return PersonProbe.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as e:
        raise GroundingError(f"cannot read the person probe {path}: {e}") from e


class Grounder:
    """ImageNet evidence -> per-photo plans and search constraints, for one model vocabulary.

    Build it with :meth:`for_model`, which also teaches the model the table's words it lacks (DCC).
    """

    def __init__(self, table: WordTable, vocab: Vocabulary, probe: PersonProbe | None,
                 policy: GroundingPolicy = GroundingPolicy(), novel: frozenset[str] = frozenset()) -> None:
        """``novel``: the words ``vocab`` only has because :meth:`for_model` added them (said only as constraints)."""
        self.table, self.vocab, self.probe, self.policy, self.novel = table, vocab, probe, policy, novel
        names, indices = table.class_to_word_matrix()
        usable = [(w, idx) for w, idx in zip(names, indices, strict=True)
                  if any(f in vocab for f in table.words[w].forms)]
        self.words = [w for w, _ in usable]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.matrix = torch.zeros(len(usable), 1000)  # (W, 1000): class c is evidence for word w
        for i, (_, idx) in enumerate(usable):
            self.matrix[i, torch.as_tensor(idx)] = 1.0
        self.tokens = {w: [vocab.index(f) for f in table.words[w].forms if f in vocab] for w in self.words}
        self.person_ids = sorted(vocab.index(w) for w in PERSON_WORDS if w in vocab)

    @classmethod
    def for_model(cls, model: CaptionModel, vocab: Vocabulary, encoder: str,
                  policy: GroundingPolicy = GroundingPolicy(), table: WordTable | None = None
                  ) -> tuple[Grounder, CaptionModel, Vocabulary]:
        """A grounder for ``model``, with the model and vocabulary grown by the table words they lack."""
        table = table or load_word_table()
        new_words, sources = [], []
        for w in sorted(table.words):
            info = table.words[w]
            if any(f in vocab for f in info.forms):
                continue
            relative = next((r for r in info.relatives if r in vocab), None)
            if relative is not None:
                new_words.append(w)
                sources.append(vocab.index(relative))
        if new_words:
            model = model.with_words(sources)
            vocab = Vocabulary(vocab.words + new_words, min_count=vocab.min_count)
        grounder = cls(table, vocab, load_person_probe(encoder), policy, frozenset(new_words))
        return grounder, model, vocab

    # ------------------------------------------------------------------------------------------------ evidence
    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) -> per-word evidence (B, W)."""
        return logits.float().softmax(-1) @ self.matrix.to(logits.device).t()

    def plans(self, logits: torch.Tensor, pooled: torch.Tensor) -> list[Plan]:
        """One plan per photo from its ImageNet logits (B, 1000) and pooled grid (B, D)."""
        ev = self.evidence(logits).cpu()  # (B, W)
        person = self.probe(pooled).cpu() if self.probe is not None else torch.ones(ev.size(0))
        p = self.policy
        out = []
        for e, pe in zip(ev, person.tolist(), strict=True):
            order = torch.argsort(e, descending=True).tolist()
            plan = Plan(person=round(pe, 4))
            plan.labels = [(self.words[i], round(float(e[i]), 4)) for i in order[: p.labels] if e[i] >= p.label_min]
            plan.say = [self.words[i] for i in order[: p.max_say] if e[i] >= p.say]
            plan.hold = [w for w in p.hold_words if w in self.index and e[self.index[w]] < p.hold]
            out.append(plan)
        return out

    def banned(self, plan: Plan) -> list[int]:
        """Token ids a photo's caption must not contain: held-back words, person words below the probe's
        threshold, and the added (novel) words unless they are to be said."""
        ids = [t for w in plan.hold for t in self.tokens[w]]
        ids += [t for w in self.novel if w not in plan.say for t in self.tokens[w]]
        if plan.person < self.policy.person_hold:
            ids += self.person_ids
        return sorted(set(ids))

    def constraints(self, plans: list[Plan], device: torch.device) -> Constraints:
        """The search's per-photo rules: the words to say, the words never to say."""
        say = [[self.tokens[w] for w in pl.say] for pl in plans]
        return Constraints.of(say, [self.banned(pl) for pl in plans], len(self.vocab), device)

    def keeps(self, plan: Plan, tokens: list[int]) -> bool:
        """Whether a caption (token ids) keeps its plan: it names every word to say, and no banned word."""
        have = set(tokens)
        return all(have.intersection(self.tokens[w]) for w in plan.say) and not have.intersection(self.banned(plan))


def fix_articles(words: list[str]) -> list[str]:
    """"a" before a vowel sound is "an" (and back): "a elephant" -> "an elephant". The vocabulary has both, but a
    word forced into a caption comes after whatever article the model chose."""
    out = list(words)
    for i in range(len(out) - 1):
        if out[i] in ("a", "an"):
            out[i] = "an" if _vowel_sound(out[i + 1]) else "a"
    return out


def _vowel_sound(word: str) -> bool:
    if word.startswith(("uni", "use", "usu", "ure", "one", "eu")):
        return False
    return word[:1] in "aeio" or word.startswith(("u", "hour", "honest", "heir"))
