"""The caption search's sentence rules for one vocabulary: ``capcli/fluency.py``'s definition of a broken
sentence, turned once into token masks that every search path applies to each step's log-probs.

Per hypothesis the search keeps one small number, its noun phrase: 0 outside one, 1 after "a" / "an" (and that
phrase's colours and adjectives so far), 2 after another opener ("the", "his", ...), 3 after a counting number
("two", not "a two year old"), 4 after a counting number's singular nouns ("two football"); plus 5 once the
phrase's colours have been joined by "and" ("a black and"). Then:

- no word twice in a row ("a sheep sheep");
- no colour or adjective twice in one noun phrase ("a yellow and yellow shirt");
- no two words in a row again within three words of themselves, unless both are function words ("a bike on a
  bike", but "on a rock on a hill");
- no ``<end>`` after a bad-ending word ("with", "the", "is"), nor inside a noun phrase ("a man in a black");
- inside a noun phrase, none of the words that cannot go on with it ("a black is", "the in"); "and" goes on after
  a colour, once a phrase ("a black and white dog", not "a black and brown and white hat");
- after "in a X", "on the X"... where X ended a phrase a few words before, none of the words that would end this
  one on it ("a bird is in a bird", "a bed in the bed"; "a bird is in a bird feeder" may go on);
- after "a" / "an" and their modifiers, no plural ("a lamps", "a small dogs"), and after a counting number's
  singular nouns, none of the words that end its phrase ("two microwave are"), nor another number ("three young
  three"): a word forced into the caption takes the form that fits its article or number.

A mask is a row of a table (phrase x "the last word is a colour", V) picked per hypothesis: no Python per word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .. import fluency


@dataclass
class Grammar:
    """Token masks of a vocabulary's words (see the module docstring); ``Grammar.of(vocab.words, end_id)``."""

    end_id: int
    end_after: torch.Tensor  # (V,) bool: <end> never follows these
    opener: torch.Tensor  # (V,) long: 1 "a" / "an", 2 another opener, 3 a number, 0 none
    singular: torch.Tensor  # (V,) bool: a number's phrase goes on after these ("two football players")
    goes_on: torch.Tensor  # (V,) bool: modifiers (colours, adjectives): a noun phrase goes on through them
    colour: torch.Tensor  # (V,) bool
    function: torch.Tensor  # (V,) bool: words that carry no thing of their own ("a", "on", "is")
    article: torch.Tensor  # (V,) bool
    containing: torch.Tensor  # (V,) bool: "in", "on", "through"...: a thing said again after these is in itself
    stops: torch.Tensor  # (V,) bool: the words that end a noun phrase, and <end>
    and_id: int  # -1 where the vocabulary has no "and"
    table: torch.Tensor  # (10 * 2, V) bool: masked words by (phrase, last word is a colour)

    @classmethod
    def of(cls, words: Sequence[str], end_id: int) -> Grammar:
        """The rules for a vocabulary (its words in token-id order)."""
        V = len(words)

        def mask(names: frozenset[str]) -> torch.Tensor:
            return torch.tensor([w in names for w in words], dtype=torch.bool)

        end_after = mask(fluency.BAD_ENDINGS)
        opener = torch.tensor([1 if w in fluency.SINGULAR_ARTICLES else 3 if w in fluency.NUMBERS else
                               2 if w in fluency.OPENERS else 0 for w in words], dtype=torch.long)
        stops = mask(fluency.NOT_IN_NOUN_PHRASE)
        stops[end_id] = True  # the phrase's noun is missing
        plural = torch.tensor([fluency.is_plural(w) for w in words], dtype=torch.bool)
        singular = ~plural & ~mask(fluency.SAME_IN_PLURAL | fluency.NUMBERS)
        and_id = words.index("and") if "and" in words else -1
        table = torch.zeros(10, 2, V, dtype=torch.bool)
        numbers = mask(fluency.NUMBERS)
        for phrase in (1, 2, 3, 4, 6, 7, 8, 9):
            kind = phrase % 5
            for after_colour in (0, 1):
                row = stops | plural if kind == 1 else stops | numbers if kind >= 3 else stops.clone()
                if after_colour and and_id >= 0 and phrase < 5:
                    row[and_id] = False
                table[phrase, after_colour] = row
        return cls(end_id, end_after, opener, singular, mask(fluency.MODIFIERS),
                   mask(fluency.COLOURS), mask(fluency.FUNCTION_WORDS), mask(fluency.ARTICLES),
                   mask(fluency.CONTAINING), stops, and_id, table.view(20, V))

    def to(self, device: torch.device | str) -> Grammar:
        if self.table.device == torch.device(device):
            return self
        return Grammar(**{f.name: v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                          for f in fields(self)})

    def mask(self, logp: torch.Tensor, seqs: torch.Tensor, phrase: torch.Tensor) -> None:
        """Mask in place the words each hypothesis may not say next: logp (R, V), its words so far seqs (R, t)
        and its noun phrase (R,)."""
        t = seqs.size(1)
        if t == 0:
            return
        last = seqs[:, -1]
        V = logp.size(1)
        key = phrase * 2 + self.colour[last].long()
        logp.masked_fill_(self.table[key, :V], float("-inf"))
        logp.scatter_(1, last[:, None], float("-inf"))  # not the same word again
        logp[:, self.end_id].masked_fill_(self.end_after[last], float("-inf"))
        self._no_modifier_twice(logp, seqs, phrase)
        self._no_object_in_itself(logp, seqs)
        for gap in range(2, min(fluency.PHRASE_WINDOW, t - 1) + 1):  # the phrase (last, next) began gap words ago
            before, after = seqs[:, t - 1 - gap], seqs[:, t - gap]
            again = (before == last) & ~(self.function[last] & self.function[after])  # (R,)
            pen = torch.zeros(again.shape, device=logp.device).masked_fill_(again, float("-inf"))
            logp.scatter_add_(1, after[:, None], pen[:, None])  # not the word that followed it then

    def _no_modifier_twice(self, logp: torch.Tensor, seqs: torch.Tensor, phrase: torch.Tensor) -> None:
        """Mask the modifiers each hypothesis's noun phrase has said: walking back from its last word through the
        phrase's modifiers (and the "and"s between colours) to its opener."""
        t = seqs.size(1)
        run = (phrase % 5 > 0) & (phrase % 5 < 4)  # (R,) rows inside a noun phrase before its nouns, walking back
        for k in range(1, t + 1):
            word = seqs[:, t - k]
            member = self.goes_on[word]
            if self.and_id >= 0 and k < t:
                member = member | ((word == self.and_id) & self.colour[seqs[:, t - k - 1]])
            run = run & member
            if not bool(run.any()):
                return
            said = run & self.goes_on[word]
            pen = torch.zeros(said.shape, device=logp.device).masked_fill_(said, float("-inf"))
            logp.scatter_add_(1, word[:, None], pen[:, None])

    def _no_object_in_itself(self, logp: torch.Tensor, seqs: torch.Tensor) -> None:
        """After "in a X" where X ended a phrase at most OBJECT_WINDOW words before "in", mask what would end this
        phrase on X: the words that cannot be in a noun phrase, and <end>."""
        t = seqs.size(1)
        if t < 4:
            return
        last = seqs[:, -1]
        rows = self.article[seqs[:, -2]] & self.containing[seqs[:, -3]] & ~self.function[last] & ~self.goes_on[last]
        if not bool(rows.any()):
            return
        window = seqs[:, max(0, t - 3 - fluency.OBJECT_WINDOW): t - 2]  # (R, w): the words up to the preposition
        ended = ((window[:, :-1] == last[:, None]) & self.stops[window[:, 1:]]).any(1)  # (R,) X, then a stop
        logp.masked_fill_((rows & ended)[:, None] & self.stops[None, :logp.size(1)], float("-inf"))

    def advance(self, phrase: torch.Tensor, last: torch.Tensor | None, word: torch.Tensor) -> torch.Tensor:
        """The noun phrase (R,) after ``word`` (R,), from the one before it (``phrase``, after word ``last``)."""
        kind, joined = phrase % 5, phrase >= 5
        opens = self.opener[word]
        colour_and = torch.zeros_like(joined)
        if last is not None and self.and_id >= 0:
            colour_and = (word == self.and_id) & self.colour[last]
        opens = torch.where((opens == 3) & (kind == 1), 2, opens)  # in "a two year old" a number counts nothing
        counting = torch.where((kind >= 3) & self.singular[word], 4, 0)  # "two football": its plural to come
        goes_on = (kind > 0) & (self.goes_on[word] | colour_and)
        kind = torch.where(opens > 0, opens, torch.where(goes_on, kind, counting))
        joined = (opens == 0) & (kind > 0) & (joined | colour_and)
        return kind + 5 * joined.long()
