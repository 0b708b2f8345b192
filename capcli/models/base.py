"""What every captioning model offers, so training and decoding treat both architectures alike.

A model consumes image features of kind ``feature_kind``:
``"pooled"`` (B, D) for Show and Tell, ``"grid"`` (B, N, D) for Show, Attend and Tell.

- ``forward(features, captions, lengths)`` is teacher forcing: ``captions`` (B, T) are token ids
  ``<start> w1 .. wn <end> <pad>..``; returns logits (B, T-1, V) predicting captions[:, 1:] and, for
  attention models, the attention weights alphas (B, T-1, N) (else None).
- ``init_state(features)`` -> state, a tuple of tensors whose first dim is the batch.
- ``step(tokens, state)`` -> (log-probs (B, V), new state, alpha (B, N) or None): one decoding step.
  Decoding (greedy, beam search) uses only image_slots/init_state/step: of the model, or of its search twin
  (``for_search``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

State = tuple[torch.Tensor, ...]


class Searchable(Protocol):
    """What decoding needs: a model, or its search twin (``CaptionModel.for_search``)."""

    image_slots: int

    def init_state(self, features: torch.Tensor) -> State: ...

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]: ...


class CaptionModel(nn.Module):
    arch: ClassVar[str]
    feature_kind: ClassVar[str]  # "pooled" or "grid"
    # The first ``image_slots`` slots of the decoding state are per image (B rows) and shared by all of an
    # image's hypotheses; the rest are per hypothesis (B*M rows, M = beams per image, 1 in greedy decoding).
    image_slots: ClassVar[int] = 0

    def config_dict(self) -> dict:
        """JSON-able config with an "arch" key; ``capcli.models.build`` turns it back into a model."""
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def init_state(self, features: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """One word for each row: (log-probs (B, V) in float32 whatever the model's dtype, new state, alpha)."""
        raise NotImplementedError

    def for_search(self, matmul: str) -> Searchable | None:
        """An inference-only twin for the caption search, its matrix products in ``matmul`` arithmetic
        ("bfloat16" or "int8", see ``packed.py``), or None where there is none (search with the model itself).

        A twin offers ``image_slots``, ``init_state`` and ``step`` like the model, and computes the same
        equations regrouped for speed; its state is its own.
        """
        return None

    def regularizer(self, alphas: torch.Tensor | None) -> torch.Tensor:
        """Extra training loss from the attention weights; none for models without attention."""
        return torch.zeros((), device=next(self.parameters()).device)

    @staticmethod
    def select_state(state: State, index: torch.Tensor) -> State:
        """Pick (and repeat) batch rows of a state, e.g. to expand for or reorder beams."""
        return tuple(t.index_select(0, index) for t in state)

    @staticmethod
    def features_of_kind(grid: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, N, D) grid -> what a model of ``kind`` consumes."""
        return grid.mean(1) if kind == "pooled" else grid
