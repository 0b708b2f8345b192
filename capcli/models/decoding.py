"""Decoding captions from a model, shared by both architectures (they expose init_state/step).

Greedy decoding lives here; batched beam search over all images of a batch at once too. Both write sound
sentences by default: no n words in a row said twice (``block_ngram``), and, given the vocabulary's ``Grammar``
(``grammar.py``: no caption ending on "with" or inside "a black", no "a lamps"), its rules; as masks on each
step's log-probs, so the readable models and their search twins (``packed.py``) follow the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Searchable
from .grammar import Grammar


def block_repeats(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """Mask in place the words that would say some ``n`` words in a row a second time: logp (R, V), each row's
    words so far seqs (R, t). (Its last n-1 words are followed by none of the words that followed them before.)"""
    t = seqs.size(1)
    if n < 2 or t < n:
        return
    earlier = seqs.unfold(1, n - 1, 1)[:, : t - n + 1]  # (R, t-n+1, n-1): each earlier run of n-1 words
    match = (earlier == seqs[:, t - n + 1:].unsqueeze(1)).all(2)  # (R, t-n+1): ... that is the last n-1 words
    pen = torch.zeros(match.shape, device=logp.device).masked_fill_(match, float("-inf"))
    logp.scatter_add_(1, seqs[:, n - 1:], pen)  # (the word that followed it)


def _check_rules(block_ngram: int) -> None:
    if block_ngram == 1 or block_ngram < 0:
        raise ValueError(f"block_ngram must be 0 (off) or at least 2 (got {block_ngram})")


@dataclass
class Decoded:
    """One generated caption: token ids (no <start>/<end>), total log-prob, attention (L, N) or None."""

    tokens: list[int]
    logprob: float
    alphas: torch.Tensor | None = None


@torch.no_grad()
def greedy(model: Searchable, features: torch.Tensor, start_id: int, end_id: int,
           max_len: int = 20, banned: Sequence[int] = (), block_ngram: int = 3,
           grammar: Grammar | None = None) -> list[Decoded]:
    """Most likely word at each step, for a batch of features; stops at <end> or ``max_len`` words.

    ``banned`` token ids (e.g. <unk>, <pad>, <start>) are never generated; nor words that repeat ``block_ngram``
    words in a row (0: off) or break the ``grammar``'s rules (see the module docstring).
    """
    _check_rules(block_ngram)
    B, dev = features.size(0), features.device
    state = model.init_state(features)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=dev)
    out: list[list[int]] = [[] for _ in range(B)]
    logp = torch.zeros(B, device=dev)
    alphas: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    grammar = grammar.to(dev) if grammar is not None else None
    seqs = torch.zeros(B, 0, dtype=torch.long, device=dev)
    phrase = torch.zeros(B, dtype=torch.long, device=dev)
    for t in range(max_len + 1):
        step_logp, state, alpha = model.step(tokens, state)  # (B, V)
        step_logp = step_logp.float()  # (this step's own tensor: masked in place)
        if banned:
            step_logp.index_fill_(1, torch.tensor(banned, device=dev), float("-inf"))
        last = tokens if t else None
        block_repeats(step_logp, seqs, block_ngram)
        if grammar is not None:
            grammar.mask(step_logp, seqs, phrase)
        best, tokens = step_logp.max(-1)
        if grammar is not None:
            phrase = grammar.advance(phrase, last, tokens)
        seqs = torch.cat([seqs, tokens.unsqueeze(1)], 1)
        logp += torch.where(done, torch.zeros_like(best), best)
        if alpha is not None:
            alphas.append(alpha)
        for i in torch.nonzero(~done & (tokens != end_id)).flatten().tolist():
            if len(out[i]) < max_len:
                out[i].append(int(tokens[i]))
        done |= tokens == end_id
        done |= torch.tensor([len(o) >= max_len for o in out], device=done.device)
        if bool(done.all()):
            break
    att = torch.stack(alphas, 1) if alphas else None  # (B, steps, N)
    return [Decoded(out[i], float(logp[i]), att[i, : len(out[i])].cpu() if att is not None else None)
            for i in range(B)]


def _norm(score: torch.Tensor, length: torch.Tensor | int, length_penalty: float) -> torch.Tensor:
    """Ranking score of a caption: raw log-prob / len^alpha (alpha = 0: the raw log-prob)."""
    if length_penalty == 0.0:
        return score
    if isinstance(length, int):
        return score / max(length, 1) ** length_penalty
    return score / length.clamp(min=1).to(score.dtype) ** length_penalty


@dataclass
class Constraints:
    """Per-image rules for a search: words each caption must contain (constrained beam search, Anderson et al.,
    2017) and words it must not.

    ``tokens`` (B, C, T): for each image up to C constraints, each met by any one of its T token ids (a word and
    its plural, say); -1 pads. A constraint with no token (all -1) is met from the start, so images with fewer
    constraints than C share the batch. The constraints' token sets must be disjoint.
    ``banned`` (B, V) bool or None: words never generated for that image (on top of the search's ``banned``), in
    any move: staying in a beam set or meeting a constraint. A banned token never meets a constraint: ``of``
    leaves it out of the image's constraints (one left with no token is met from the start), and a search masks
    it in every move all the same (it may be among ``tokens`` built by hand).
    """

    tokens: torch.Tensor
    banned: torch.Tensor | None = None

    @classmethod
    def of(cls, per_image: Sequence[Sequence[Sequence[int]]], banned: Sequence[Sequence[int]] | None = None,
           vocab_size: int = 0, device: torch.device | str = "cpu") -> Constraints:
        """From lists: per image, a list of constraints (each a list of token ids) and a list of banned ids."""
        C = max((len(c) for c in per_image), default=0)
        T = max((len(t) for c in per_image for t in c), default=1)
        tok = torch.full((len(per_image), C, T), -1, dtype=torch.long)
        for b, cons in enumerate(per_image):
            ban = set(banned[b]) if banned is not None else set()
            for c, ids in enumerate(cons):
                ids = [i for i in ids if i not in ban]  # "bicyclist" does not say bicycle where people are banned
                tok[b, c, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        ban = None
        if banned is not None and any(banned):
            ban = torch.zeros(len(per_image), vocab_size, dtype=torch.bool)
            for b, ids in enumerate(banned):
                ban[b, list(ids)] = True
            ban = ban.to(device)
        return cls(tok.to(device), ban)

    @property
    def count(self) -> int:
        return self.tokens.size(1)


class _Sets:
    """The beam sets of a constrained search: one per subset of constraints met, numbered by bit mask.

    Set s holds hypotheses that have met exactly the constraints of s; a word of an unmet constraint c moves a
    hypothesis from s to s | 2^c. Captions may end in any set, but one that misses constraints ranks below every
    caption that meets them all (``MISSING`` per constraint), so it is what comes out only where none does.
    """

    MISSING = -1e4

    def __init__(self, cons: Constraints | None, dev: torch.device) -> None:
        C = cons.count if cons is not None else 0
        self.C, self.S = C, 1 << C
        self.banned = cons.banned if cons is not None else None  # (B, V) | None: masked in every move
        self.tokens = cons.tokens if cons is not None and C > 0 else None  # (B, C, T)
        self._stay_bias: torch.Tensor | None = None
        if self.tokens is None:
            return
        assert cons is not None
        S = self.S
        bits = torch.tensor([[(s >> c) & 1 for c in range(C)] for s in range(S)], device=dev, dtype=torch.bool)
        # Constraints whose tokens are all padding are met from the start: each image's first set.
        empty = (cons.tokens < 0).all(2)  # (B, C)
        self.first = (empty.long() * (1 << torch.arange(C, device=dev))).sum(1)  # (B,)
        self.source = torch.tensor([[s ^ (1 << c) for c in range(C)] for s in range(S)], device=dev)  # (S, C)
        self.valid = bits  # target set s is reached through constraint c only if s has c
        missing = C - bits.sum(1)  # (S,)
        self.penalty = missing.float() * self.MISSING  # (S,)

    def stay_bias(self, V: int, dev: torch.device) -> torch.Tensor:
        """(B, S, V): -inf for the words of the constraints a set has not met (such a word is no "stay" move: it
        changes the set, see ``transitions``), else 0."""
        assert self.tokens is not None
        if self._stay_bias is None:
            bias = torch.zeros(self.tokens.size(0), self.S, V, device=dev)
            for c in range(self.C):
                tok = self.tokens[:, c]  # (B, T)
                rows, cols = torch.nonzero(tok >= 0, as_tuple=True)
                for s in range(self.S):
                    if not (s >> c) & 1:
                        bias[rows, s, tok[rows, cols]] = float("-inf")
            self._stay_bias = bias
        return self._stay_bias

    def initial(self, B: int, dev: torch.device) -> torch.Tensor:
        """Scores (B, S, 1) before the first word: 0 in each image's first set, -inf (empty) elsewhere."""
        if self.tokens is None:
            return torch.zeros(B, 1, 1, device=dev)
        live = torch.full((B, self.S, 1), float("-inf"), device=dev)
        live[torch.arange(B, device=dev), self.first, 0] = 0.0
        return live

    def transitions(self, lp: torch.Tensor, live: torch.Tensor, img: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates that meet one more constraint: for each target set s and constraint c in s, every
        hypothesis of s - {c} followed by c's likeliest token. lp (Bact, S, M, V), live (Bact, S, M) ->
        scores, words, parents (hypothesis index s*M + m): each (Bact, S, C*M)."""
        assert self.tokens is not None
        Bact, S, M, _ = lp.shape
        C, tok = self.C, self.tokens[img]  # (Bact, C, T)
        T = tok.size(2)
        safe = tok.clamp(min=0).view(Bact, 1, 1, C * T).expand(Bact, S, M, C * T)
        g = lp.gather(3, safe).view(Bact, S, M, C, T).masked_fill((tok < 0).view(Bact, 1, 1, C, T), float("-inf"))
        best, arg = g.max(4)  # (Bact, S, M, C): from source set s, the best token of constraint c
        word = safe.view(Bact, S, M, C, T).gather(4, arg.unsqueeze(4)).squeeze(4)
        score = live.unsqueeze(3) + best
        c_idx = torch.arange(C, device=lp.device).expand(S, C)
        # Advanced indices on dims 1 and 3 -> (S, C, Bact, M); then (Bact, S, C, M).
        score = score[:, self.source, :, c_idx].permute(2, 0, 1, 3)
        word = word[:, self.source, :, c_idx].permute(2, 0, 1, 3)
        score = score.masked_fill(~self.valid.view(1, S, C, 1), float("-inf"))
        parent = (self.source.view(1, S, C, 1) * M + torch.arange(M, device=lp.device).view(1, 1, 1, M))
        return score.reshape(Bact, S, C * M), word.reshape(Bact, S, C * M), parent.expand(Bact, S, C, M).reshape(
            Bact, S, C * M)


@torch.no_grad()
def beam_search(model: Searchable, features: torch.Tensor, start_id: int, end_id: int, beam_size: int = 3,
                max_len: int = 20, length_penalty: float = 0.0, top_k: int = 1,
                banned: Sequence[int] = (), with_alphas: bool = True,
                constraints: Constraints | None = None, block_ngram: int = 3,
                grammar: Grammar | None = None) -> list[list[Decoded]]:
    """Beam search over ALL images of a batch at once; per image its ``top_k`` best captions, best first.

    The B x K live hypotheses are one flat batch of B*K rows for ``model.step``. At every step each image's
    K x V continuations are ranked by raw log-prob; an ``<end>`` continuation among the K best finishes a
    caption, and the K best continuations that do not end stay live (so the beam stays K wide). A caption
    reaching ``max_len`` words is finished as it is (no ``<end>`` term, like :func:`greedy`), so beam 1 equals
    greedy. Finished captions are ranked by ``logprob / len^length_penalty`` (len = scored tokens, ``<end>``
    included); ``logprob`` reported is always the raw sum; ``banned`` token ids are never generated. An image
    stops early once its ``top_k``-th best finished caption beats any score its live hypotheses could still
    reach (nothing found later could enter its top_k); stopped images leave the batch. ``with_alphas=False``
    skips keeping each hypothesis's attention weights (``Decoded.alphas`` is then None).

    ``constraints``: words each image's caption must contain. Each image then keeps one beam of K per subset of
    its constraints met (:class:`_Sets`, 2^C beams), all in the same flat batch; with none, this is the plain
    search, step for step.

    No caption repeats ``block_ngram`` words in a row (0: off), nor breaks the ``grammar``'s rules (the
    vocabulary's: see ``grammar.py``); both are masks on every step's log-probs, plain and constrained alike.

    Everything stays on the features' device: a few host syncs per step (to find endings, drop finished images).
    """
    if beam_size < 1 or not 1 <= top_k <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= top_k <= beam_size (got {beam_size}, {top_k})")
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    _check_rules(block_ngram)
    return _BeamSearch(model, features, start_id, end_id, beam_size, max_len, length_penalty, top_k, banned,
                       with_alphas, constraints, block_ngram, grammar).run()


class _BeamSearch:
    """The state of one batched beam search (see :func:`beam_search`); shapes use Bact images still searching,
    S beam sets (1 without constraints), M hypotheses per set (1 before the first word, then K) and H = S*M."""

    def __init__(self, model: Searchable, features: torch.Tensor, start_id: int, end_id: int, K: int, max_len: int,
                 length_penalty: float, top_k: int, banned: Sequence[int], with_alphas: bool,
                 constraints: Constraints | None, block_ngram: int, grammar: Grammar | None) -> None:
        self.model, self.K, self.max_len, self.lp, self.top_k = model, K, max_len, length_penalty, top_k
        self.end_id, self.with_alphas = end_id, with_alphas
        self.dev = dev = features.device
        B = self.B = features.size(0)
        self.sets = _Sets(constraints, dev)
        S = self.sets.S
        state = model.init_state(features)
        # The model's per-image state slots (e.g. the image grid) are shared by an image's beams: never copied per
        # beam, only narrowed when images leave the batch. Per-hypothesis slots start as one row per set.
        self.shared = model.image_slots
        if S > 1:
            state = tuple(s if i < self.shared else s.repeat_interleave(S, 0) for i, s in enumerate(state))
        self.state = state
        self.tokens = torch.full((B * S,), start_id, dtype=torch.long, device=dev)
        self.img = torch.arange(B, device=dev)  # images still searching: their ids in the batch
        self.live = self.sets.initial(B, dev)  # (Bact, S, M) raw scores
        self.seqs = torch.zeros(B, S, 0, dtype=torch.long, device=dev)  # (Bact, H, t) words so far
        self.att: torch.Tensor | None = None  # (Bact, H, t, N) attention per word, for attention models
        # The K best finished captions of every image, padded to max_len.
        self.fin_norm = torch.full((B, K), float("-inf"), device=dev)
        self.fin_logp = torch.full((B, K), float("-inf"), device=dev)
        self.fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
        self.fin_tok = torch.zeros(B, K, max_len, dtype=torch.long, device=dev)
        self.fin_att: torch.Tensor | None = None
        self.ban = torch.tensor(banned, device=dev) if banned else None
        self.block_ngram = block_ngram
        self.grammar = grammar.to(dev) if grammar is not None else None
        self.phrase = torch.zeros(B, S, dtype=torch.long, device=dev)  # (Bact, H): see Grammar

    def merge(self, rows: torch.Tensor, norm: torch.Tensor, logp: torch.Tensor, length: torch.Tensor,
              tok: torch.Tensor, al: torch.Tensor | None) -> None:
        """Fold new finished candidates (Bact, X) of images ``rows`` into their K best finished."""
        K, max_len = self.K, self.max_len
        pad = max_len - tok.size(2)
        tok = torch.nn.functional.pad(tok, (0, pad))
        all_norm = torch.cat([self.fin_norm[rows], norm], 1)  # (Bact, K + X)
        best = all_norm.topk(K, dim=1).indices  # (Bact, K)
        self.fin_norm[rows] = all_norm.gather(1, best)
        self.fin_logp[rows] = torch.cat([self.fin_logp[rows], logp], 1).gather(1, best)
        self.fin_len[rows] = torch.cat([self.fin_len[rows], length], 1).gather(1, best)
        self.fin_tok[rows] = torch.cat([self.fin_tok[rows], tok], 1).gather(
            1, best.unsqueeze(2).expand(-1, -1, max_len))
        if al is not None:
            if self.fin_att is None:
                self.fin_att = torch.zeros(self.B, K, max_len, al.size(3), device=self.dev)
            al = torch.nn.functional.pad(al, (0, 0, 0, pad))
            idx = best[:, :, None, None].expand(-1, -1, max_len, al.size(3))
            self.fin_att[rows] = torch.cat([self.fin_att[rows], al], 1).gather(1, idx)

    def candidates(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's 2K best continuations of each beam set: scores, parents (index into H), words; each
        (Bact, S, 2K), best first."""
        Bact, S, M = self.live.shape
        V, K2 = logp.size(1), 2 * self.K
        lp = logp.view(Bact, S, M, V)
        stay = lp + self.sets.stay_bias(V, self.dev)[self.img].unsqueeze(2) if self.sets.tokens is not None else lp
        # The 2K best continuations of each set are among the 2K best words of each of its hypotheses.
        word_top, word_idx = stay.topk(K2, dim=3)  # (Bact, S, M, 2K)
        scores = (self.live.unsqueeze(3) + word_top).view(Bact, S, M * K2)
        words = word_idx.view(Bact, S, M * K2)
        if self.sets.tokens is None:
            top, j = scores.topk(K2, dim=2)  # (Bact, S, 2K), best first
            return top, j // K2, words.gather(2, j)  # at most M <= K of them end
        in_set = torch.arange(S, device=self.dev).view(1, S, 1) * M
        parents = (in_set + torch.arange(M * K2, device=self.dev).view(1, 1, -1) // K2).expand(Bact, S, M * K2)
        t_scores, t_words, t_parents = self.sets.transitions(lp, self.live, self.img)
        scores, words = torch.cat([scores, t_scores], 2), torch.cat([words, t_words], 2)
        parents = torch.cat([parents, t_parents], 2)
        top, j = scores.topk(K2, dim=2)
        return top, parents.gather(2, j), words.gather(2, j)

    def finish(self, t: int, top: torch.Tensor, parent: torch.Tensor, ends: torch.Tensor,
               a_hist: torch.Tensor | None) -> None:
        """Captions ending now (<end> among a set's K best) join their image's finished ones; their words are the
        parent's (t words, t+1 scored tokens)."""
        K, S = self.K, self.sets.S
        rows = torch.nonzero(ends[:, :, :K].flatten(1).any(1)).flatten()  # the images where a caption ends now
        if not rows.numel():
            return
        R = rows.numel()
        p, top_r = parent[rows, :, :K].reshape(R, S * K), top[rows, :, :K].reshape(R, S * K)
        cand_tok = self.seqs[rows].gather(1, p.unsqueeze(2).expand(-1, -1, t))  # (R, S*K, t)
        cand_att = None
        if a_hist is not None:
            idx = p[:, :, None, None].expand(-1, -1, t + 1, a_hist.size(3))
            cand_att = a_hist[rows].gather(1, idx)[:, :, :t]
        norm = _norm(top_r, t + 1, self.lp)
        if S > 1:
            norm = norm + self.sets.penalty.repeat_interleave(K).view(1, S * K)
        norm = torch.where(ends[rows, :, :K].reshape(R, S * K), norm, float("-inf"))
        self.merge(self.img[rows], norm, top_r, torch.full_like(p, t), cand_tok, cand_att)

    def run(self) -> list[list[Decoded]]:
        K, S, dev = self.K, self.sets.S, self.dev
        rank = torch.arange(2 * K, device=dev)
        for t in range(self.max_len):
            Bact, _, M = self.live.shape
            logp, self.state, alpha = self.model.step(self.tokens, self.state)  # (Bact*H, V), alpha (Bact*H, N)
            logp = logp.float()  # scores add up in float32, also under autocast
            if self.ban is not None:  # words never to generate, e.g. <unk> (logp is this step's own tensor)
                logp.index_fill_(1, self.ban, float("-inf"))
            self.rules(logp, t)
            if logp.size(1) < 2 * K:
                raise ValueError(f"beam size {K} is too large for a vocabulary of {logp.size(1)} words")
            alpha = alpha.float() if alpha is not None and self.with_alphas else None
            top, parent, word = self.candidates(logp)
            ends = word == self.end_id
            a_hist = None
            if alpha is not None:
                a_hist = alpha.view(Bact, S * M, 1, -1)
                a_hist = a_hist if self.att is None else torch.cat([self.att, a_hist], 2)  # (Bact, H, t+1, N)
            self.finish(t, top, parent, ends, a_hist)
            # Live: the K best continuations of each set that do not end (ending ones sort after all others).
            keep = (ends.long() * 2 * K + rank).argsort(dim=2)[:, :, :K]  # (Bact, S, K)
            self.live = top.gather(2, keep)
            parent, word = parent.gather(2, keep).view(Bact, S * K), word.gather(2, keep).view(Bact, S * K)
            if self.grammar is not None:
                last = self.seqs[:, :, -1].gather(1, parent) if t else None
                self.phrase = self.grammar.advance(self.phrase.gather(1, parent), last, word)
            self.seqs = torch.cat([self.seqs.gather(1, parent.unsqueeze(2).expand(-1, -1, t)),
                                   word.unsqueeze(2)], 2)
            if a_hist is not None:
                self.att = a_hist.gather(1, parent[:, :, None, None].expand(-1, -1, t + 1, a_hist.size(3)))
            if t == self.max_len - 1 or not self.narrow(parent, word, S * M):
                break
        return self.results()

    def rules(self, logp: torch.Tensor, t: int) -> None:
        """Mask in place (Bact*H, V) what no hypothesis may say next: its image's banned words, repeats, what
        breaks the grammar."""
        if self.sets.banned is not None:
            Bact = self.img.size(0)
            logp.view(Bact, -1, logp.size(1)).masked_fill_(self.sets.banned[self.img].unsqueeze(1), float("-inf"))
        seqs = self.seqs.flatten(0, 1)  # (Bact*H, t)
        block_repeats(logp, seqs, self.block_ngram)
        if self.grammar is not None:
            self.grammar.mask(logp, seqs, self.phrase.flatten())

    def narrow(self, parent: torch.Tensor, word: torch.Tensor, H: int) -> bool:
        """Stop images whose top_k-th best finished caption no live hypothesis can still beat; reorder the state
        for the next step. False when no image goes on."""
        reach = self.live[:, :, 0].max(1).values / (self.max_len ** self.lp if self.lp > 0 else 1.0)
        going = self.fin_norm[self.img, self.top_k - 1] < reach  # (Bact,)
        if not bool(going.any()):
            self.live = self.live[:0]
            return False
        Bact = going.size(0)
        everyone = bool(going.all())
        kept = torch.arange(Bact, device=self.dev) if everyone else torch.nonzero(going).flatten()
        if not everyone:
            self.img, self.live, self.seqs, word = self.img[kept], self.live[kept], self.seqs[kept], word[kept]
            self.phrase = self.phrase[kept]
            self.att = self.att[kept] if self.att is not None else None
        self.tokens = word.flatten()
        index = (kept.unsqueeze(1) * H + parent[kept]).flatten()  # (Bact'*S*K,) parent row of each hypothesis
        self.state = tuple((s if everyone else s.index_select(0, kept)) if i < self.shared
                           else s.index_select(0, index) for i, s in enumerate(self.state))
        return True

    def results(self) -> list[list[Decoded]]:
        S, K = self.sets.S, self.K
        if self.live.size(0):  # captions that reached max_len words end there, without an <end> term
            Bact = self.live.size(0)
            live = self.live.view(Bact, S * K)
            norm = _norm(live, self.max_len, self.lp)
            if S > 1:
                norm = norm + self.sets.penalty.repeat_interleave(K).view(1, S * K)
            self.merge(self.img, norm, live, torch.full_like(live, self.max_len, dtype=torch.long), self.seqs,
                       self.att)
        fin_logp_c, fin_len_c, fin_tok_c = self.fin_logp.cpu(), self.fin_len.cpu(), self.fin_tok.cpu()
        fin_att_c = self.fin_att.cpu() if self.fin_att is not None else None
        out: list[list[Decoded]] = []
        for b in range(self.B):
            hyps = []
            for k in range(self.top_k):
                n = int(fin_len_c[b, k])
                hyps.append(Decoded(fin_tok_c[b, k, :n].tolist(), float(fin_logp_c[b, k]),
                                    fin_att_c[b, k, :n].clone() if fin_att_c is not None else None))
            out.append(hyps)
        return out


def sample(model: Searchable, features: torch.Tensor, n: int, start_id: int, end_id: int, max_len: int = 20,
           banned: Sequence[int] = ()) -> tuple[list[list[int]], torch.Tensor]:
    """Draw ``n`` captions per image from the model's distribution, WITH gradients (self-critical training).

    Returns the B*n token lists (image-major: rows i*n .. i*n+n-1 are image i's; no <end>) and each one's
    summed log-probability (B*n,), <end> included, differentiable. ``banned`` ids are never drawn.
    """
    B, dev = features.size(0), features.device
    state = model.init_state(features)
    state = tuple(s if i < model.image_slots else s.repeat_interleave(n, 0) for i, s in enumerate(state))
    tokens = torch.full((B * n,), start_id, dtype=torch.long, device=dev)
    done = torch.zeros(B * n, dtype=torch.bool, device=dev)
    total = torch.zeros(B * n, device=dev)
    words: list[torch.Tensor] = []
    ban = torch.tensor(banned, device=dev) if banned else None
    for t in range(max_len + 1):
        logp, state, _ = model.step(tokens, state)  # (B*n, V) float32
        if ban is not None:
            logp = torch.log_softmax(logp.index_fill(1, ban, float("-inf")), -1)
        if t == max_len:  # a caption still going here ends as it is (no <end> term), as in greedy()
            break
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        total = total + torch.where(done, 0.0, logp.gather(1, tokens.unsqueeze(1)).squeeze(1))
        words.append(torch.where(done, end_id, tokens))
        done = done | (tokens == end_id)
        if bool(done.all()):
            break
    rows = torch.stack(words, 1).tolist()  # (B*n, T)
    return [r[: r.index(end_id)] if end_id in r else r for r in rows], total
