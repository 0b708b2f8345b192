"""The caption search's options, in one place: :class:`SearchOptions`, checked once when made, and :func:`search`.

``capcli caption`` / ``capcli evaluate`` (through :class:`capcli.captioner.Captioner`), training's validation
(``train/loop.py``'s ``_generate``) and self-critical training (``scst_loss``) all search with one of these, so
the captions validation scores (and ``best.pt`` is chosen on) are searched as ``capcli evaluate`` searches them:
the same banned specials (<pad>, <start>, <unk>: alt-text never says "<unk>").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import UsageError
from .models.base import Searchable
from .models.decoding import Constraints, Decoded, beam_search, greedy
from .models.grammar import Grammar
from .vocab import Vocabulary

# The models are recurrent (no positional limit) but trained on captions cut to 20 words; past ~100 words a caption
# only repeats itself, and the search's buffers grow with the length.
MAX_LEN_LIMIT = 100
# Beams are ranked by logprob / len^ALPHA: above ~2 only the longest captions win; 5 keeps 100^ALPHA far inside
# float32 (a huge ALPHA overflowed it).
LENGTH_PENALTY_LIMIT = 5.0


@dataclass(frozen=True)
class SearchOptions:
    """How captions are searched for one vocabulary; made by :meth:`of`, checked when made (one error line
    naming the command-line option, a :class:`UsageError`)."""

    beam_size: int = 3  # 1: greedy
    max_len: int = 20  # words
    top_k: int = 1  # captions kept per image (the best, then alternatives)
    length_penalty: float = 0.0  # beams ranked by logprob / len^length_penalty
    start_id: int = Vocabulary.start_id
    end_id: int = Vocabulary.end_id
    banned: tuple[int, ...] = ()  # token ids never generated
    vocab_size: int = 0  # 0: not checked against a vocabulary
    block_ngram: int = 3  # no n words in a row said twice (0: off)
    grammar: Grammar | None = field(default=None, compare=False, repr=False)  # the vocabulary's sentence rules

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise UsageError("--beam must be at least 1")
        if self.top_k < 1 or self.top_k > self.beam_size:
            raise UsageError(f"--top-k {self.top_k} needs --beam >= {self.top_k} (it is {self.beam_size})")
        if not 1 <= self.max_len <= MAX_LEN_LIMIT:
            raise UsageError(f"--max-len {self.max_len}: give a number of words from 1 to {MAX_LEN_LIMIT}")
        if not 0.0 <= self.length_penalty <= LENGTH_PENALTY_LIMIT:  # also NaN
            raise UsageError(f"--length-penalty {self.length_penalty:g}: give a number from 0 to "
                             f"{LENGTH_PENALTY_LIMIT:g}")
        if self.block_ngram == 1 or self.block_ngram < 0:
            raise UsageError(f"block_ngram {self.block_ngram}: give 0 (off) or at least 2")
        if self.vocab_size and 2 * self.beam_size > self.vocab_size:
            raise UsageError(f"--beam {self.beam_size} is too large for a vocabulary of {self.vocab_size} words")

    @classmethod
    def of(cls, vocab: Vocabulary, beam_size: int = 3, max_len: int = 20, top_k: int = 1,
           length_penalty: float = 0.0, sound: bool = True) -> SearchOptions:
        """The options for a model with ``vocab``: its <start>/<end>, and its specials banned (<pad>, <start>,
        <unk>); ``sound`` (the default): no repeated trigram, and the vocabulary's :class:`Grammar` (no caption
        ending on "with" or inside "a black", no "a lamps")."""
        return cls(beam_size, max_len, top_k, length_penalty, vocab.start_id, vocab.end_id,
                   (vocab.pad_id, vocab.start_id, vocab.unk_id), len(vocab), block_ngram=3 if sound else 0,
                   grammar=_grammar(tuple(vocab.words), vocab.end_id) if sound else None)


@functools.lru_cache(maxsize=4)
def _grammar(words: Sequence[str], end_id: int) -> Grammar:
    return Grammar.of(words, end_id)  # once per vocabulary: the masks are a few tables of V booleans


def search(model: Searchable, features: torch.Tensor, opts: SearchOptions, *, extra_beams: int = 0,
           constraints: Constraints | None = None, with_alphas: bool = False,
           greedy_at_1: bool = True) -> list[list[Decoded]]:
    """Per image its ``top_k`` best captions, best first: :func:`greedy` at beam 1 (unless ``greedy_at_1`` is
    false: the grounded search is a beam search at every width), else the batched beam search ``extra_beams``
    wider than ``opts.beam_size``, under ``constraints`` if any."""
    if opts.beam_size == 1 and greedy_at_1 and not extra_beams and constraints is None:
        return [[d] for d in greedy(model, features, opts.start_id, opts.end_id, opts.max_len, banned=opts.banned,
                                    block_ngram=opts.block_ngram, grammar=opts.grammar)]
    return beam_search(model, features, opts.start_id, opts.end_id, beam_size=opts.beam_size + extra_beams,
                       max_len=opts.max_len, length_penalty=opts.length_penalty, top_k=opts.top_k,
                       banned=opts.banned, with_alphas=with_alphas, constraints=constraints,
                       block_ngram=opts.block_ngram, grammar=opts.grammar)
