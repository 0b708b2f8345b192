"""Decoding captions from a model, shared by both architectures (they expose init_state/step).

Greedy decoding lives here; batched beam search over all images of a batch at once too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CaptionModel


@dataclass
class Decoded:
    """One generated caption: token ids (no <start>/<end>), total log-prob, attention (L, N) or None."""

    tokens: list[int]
    logprob: float
    alphas: torch.Tensor | None = None


@torch.no_grad()
def greedy(model: CaptionModel, features: torch.Tensor, start_id: int, end_id: int,
           max_len: int = 20) -> list[Decoded]:
    """Most likely word at each step, for a batch of features; stops at <end> or ``max_len`` words."""
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=features.device)
    out: list[list[int]] = [[] for _ in range(B)]
    logp = torch.zeros(B, device=features.device)
    alphas: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    for _ in range(max_len + 1):
        step_logp, state, alpha = model.step(tokens, state)  # (B, V)
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
