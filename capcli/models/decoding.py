"""Decoding captions from a model, shared by both architectures (they expose init_state/step).

Greedy decoding lives here; batched beam search over all images of a batch at once too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Searchable

PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _native_bfloat16() -> bool:
    try:  # a private probe: a torch without it gets float32
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic of a caption search's matrix products: ``float32``, ``bfloat16``, ``int8``, or ``auto``.

    ``auto`` on a CPU is int8 where it has VNNI (AVX512-VNNI or AVX-VNNI: int8 products ~2x bfloat16's),
    else bfloat16 where it computes that natively (AVX512-BF16 or AMX, through oneDNN), else float32; on a GPU,
    float32. Below float32 the search runs the model's twin (``CaptionModel.for_search``): only the products
    round differently, everything else stays float32. On Flickr8k val the shipped model scores the same
    either way (README, `capcli caption`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision 'int8' is for CPUs: on a GPU use float32 or bfloat16")
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "float32"
    if {"avx512_vnni", "avx_vnni"} & _cpu_flags() and hasattr(torch, "_int_mm"):
        return "int8"
    return "bfloat16" if _native_bfloat16() else "float32"


@dataclass
class Decoded:
    """One generated caption: token ids (no <start>/<end>), total log-prob, attention (L, N) or None."""

    tokens: list[int]
    logprob: float
    alphas: torch.Tensor | None = None


@torch.no_grad()
def greedy(model: Searchable, features: torch.Tensor, start_id: int, end_id: int,
           max_len: int = 20, banned: Sequence[int] = ()) -> list[Decoded]:
    """Most likely word at each step, for a batch of features; stops at <end> or ``max_len`` words.

    ``banned`` token ids (e.g. <unk>, <pad>, <start>) are never generated.
    """
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=features.device)
    out: list[list[int]] = [[] for _ in range(B)]
    logp = torch.zeros(B, device=features.device)
    alphas: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    for _ in range(max_len + 1):
        step_logp, state, alpha = model.step(tokens, state)  # (B, V)
        if banned:
            step_logp = step_logp.index_fill(1, torch.tensor(banned, device=step_logp.device), float("-inf"))
        best, tokens = step_logp.max(-1)
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


@torch.no_grad()
def beam_search(model: Searchable, features: torch.Tensor, start_id: int, end_id: int, beam_size: int = 3,
                max_len: int = 20, length_penalty: float = 0.0, top_k: int = 1,
                banned: Sequence[int] = (), with_alphas: bool = True) -> list[list[Decoded]]:
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

    Everything stays on the features' device: a few host syncs per step (to find endings, drop finished images).
    """
    if beam_size < 1 or not 1 <= top_k <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= top_k <= beam_size (got {beam_size}, {top_k})")
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    K, dev = beam_size, features.device
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=dev)
    img = torch.arange(B, device=dev)  # images still searching: their ids in the batch
    live = torch.zeros(B, 1, device=dev)  # (Bact, M) raw scores; M = 1 before the first step, then K
    seqs = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)  # (Bact, M, t) words so far
    att: torch.Tensor | None = None  # (Bact, M, t, N) attention per word, for attention models
    # The K best finished captions of every image, padded to max_len.
    fin_norm = torch.full((B, K), float("-inf"), device=dev)
    fin_logp = torch.full((B, K), float("-inf"), device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_tok = torch.zeros(B, K, max_len, dtype=torch.long, device=dev)
    fin_att: torch.Tensor | None = None
    # The model's per-image state slots (e.g. the image grid) are shared by an image's beams: never copied per
    # beam, only narrowed when images leave the batch.
    shared = model.image_slots
    ban = torch.tensor(banned, device=dev) if banned else None

    def merge(rows: torch.Tensor, norm: torch.Tensor, logp: torch.Tensor, length: torch.Tensor,
              tok: torch.Tensor, al: torch.Tensor | None) -> None:
        """Fold new finished candidates (Bact, C) of images ``rows`` into their K best finished."""
        nonlocal fin_att
        pad = max_len - tok.size(2)
        tok = torch.nn.functional.pad(tok, (0, pad))
        all_norm = torch.cat([fin_norm[rows], norm], 1)  # (Bact, K + C)
        best = all_norm.topk(K, dim=1).indices  # (Bact, K)
        fin_norm[rows] = all_norm.gather(1, best)
        fin_logp[rows] = torch.cat([fin_logp[rows], logp], 1).gather(1, best)
        fin_len[rows] = torch.cat([fin_len[rows], length], 1).gather(1, best)
        fin_tok[rows] = torch.cat([fin_tok[rows], tok], 1).gather(1, best.unsqueeze(2).expand(-1, -1, max_len))
        if al is not None:
            if fin_att is None:
                fin_att = torch.zeros(B, K, max_len, al.size(3), device=dev)
            al = torch.nn.functional.pad(al, (0, 0, 0, pad))
            idx = best[:, :, None, None].expand(-1, -1, max_len, al.size(3))
            fin_att[rows] = torch.cat([fin_att[rows], al], 1).gather(1, idx)

    for t in range(max_len):
        Bact, M = live.shape
        logp, state, alpha = model.step(tokens, state)  # (Bact*M, V), alpha (Bact*M, N) | None
        logp = logp.float()  # scores add up in float32, also under autocast
        if ban is not None:  # words never to generate, e.g. <unk> (logp is this step's own tensor)
            logp.index_fill_(1, ban, float("-inf"))
        alpha = alpha.float() if alpha is not None and with_alphas else None
        V = logp.size(1)
        if V < 2 * K:
            raise ValueError(f"beam size {K} is too large for a vocabulary of {V} words")
        # The 2K best continuations of each image are among the 2K best words of each of its hypotheses.
        word_top, word_idx = logp.view(Bact, M, V).topk(2 * K, dim=2)  # (Bact, M, 2K)
        top, j = (live.unsqueeze(2) + word_top).view(Bact, M * 2 * K).topk(2 * K, dim=1)  # (Bact, 2K), best first
        parent, word = j // (2 * K), word_idx.view(Bact, M * 2 * K).gather(1, j)  # at most M <= K of them end
        ends = word == end_id
        rank = torch.arange(2 * K, device=dev)
        if alpha is not None:
            a_hist = alpha.view(Bact, M, 1, -1)
            a_hist = a_hist if att is None else torch.cat([att, a_hist], 2)  # (Bact, M, t+1, N)
        # Finished: <end> among the K best. Their words are the parent's (t words, t+1 scored tokens).
        rows = torch.nonzero(ends[:, :K].any(1)).flatten()  # the images where a caption ends now
        if rows.numel():
            p, top_r = parent[rows, :K], top[rows, :K]
            cand_tok = seqs[rows].gather(1, p.unsqueeze(2).expand(-1, -1, t))  # (R, K, t)
            cand_att = None
            if alpha is not None:
                idx = p[:, :, None, None].expand(-1, -1, t + 1, a_hist.size(3))
                cand_att = a_hist[rows].gather(1, idx)[:, :, :t]
            norm = torch.where(ends[rows, :K], _norm(top_r, t + 1, length_penalty), float("-inf"))
            merge(img[rows], norm, top_r, torch.full_like(p, t), cand_tok, cand_att)
        # Live: the K best continuations that do not end (ending ones sort after all others).
        keep = (ends.long() * 2 * K + rank).argsort(dim=1)[:, :K]  # (Bact, K)
        live = top.gather(1, keep)
        parent, word = parent.gather(1, keep), word.gather(1, keep)
        seqs = torch.cat([seqs.gather(1, parent.unsqueeze(2).expand(-1, -1, t)), word.unsqueeze(2)], 2)
        if alpha is not None:
            att = a_hist.gather(1, parent[:, :, None, None].expand(-1, -1, t + 1, a_hist.size(3)))
        if t == max_len - 1:
            break
        # Stop images whose top_k-th best finished caption no live hypothesis can still beat.
        reach = live[:, 0] / (max_len ** length_penalty if length_penalty > 0 else 1.0)
        going = fin_norm[img, top_k - 1] < reach  # (Bact,)
        if not bool(going.any()):
            live = live[:0]
            break
        everyone = bool(going.all())
        kept = torch.arange(Bact, device=dev) if everyone else torch.nonzero(going).flatten()
        if not everyone:
            img, live, seqs, word = img[kept], live[kept], seqs[kept], word[kept]
            att = att[kept] if att is not None else None
        tokens = word.flatten()
        index = (kept.unsqueeze(1) * M + parent[kept]).flatten()  # (Bact'*K,) parent row of each hypothesis
        state = tuple((s if everyone else s.index_select(0, kept)) if i < shared else s.index_select(0, index)
                      for i, s in enumerate(state))
    if live.size(0):  # captions that reached max_len words end there, without an <end> term
        merge(img, _norm(live, max_len, length_penalty), live, torch.full_like(live, max_len, dtype=torch.long),
              seqs, att)
    fin_logp_c, fin_len_c, fin_tok_c = fin_logp.cpu(), fin_len.cpu(), fin_tok.cpu()
    fin_att_c = fin_att.cpu() if fin_att is not None else None
    out: list[list[Decoded]] = []
    for b in range(B):
        hyps = []
        for k in range(top_k):
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
