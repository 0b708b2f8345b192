"""Show and Tell (Vinyals, Toshev, Bengio, Erhan, CVPR 2015): "A Neural Image Caption Generator".

The image is seen once. Its pooled CNN feature is mapped into the word-embedding space,

    x_{-1} = W_I CNN(I),   x_t = W_e S_t,   h_t = LSTM(x_t, h_{t-1}),   p_{t+1} = softmax(W_o h_t)

and fed as the first input step (the paper, ``condition="first-step"``) or, as many re-implementations
do, used to set the RNN's initial state (``condition="init-state"``: h_0 = tanh(W_h f), c_0 = tanh(W_c f)).
The cell is an LSTM in the paper; ``cell="gru"`` or ``"rnn"`` swap it for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import register
from .base import CaptionModel, State
from .packed import LSTMWeights, PackedLinear, lstm_update

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass
class ShowTellConfig:
    vocab_size: int
    feature_dim: int
    embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    cell: str = "lstm"
    condition: str = "first-step"  # or "init-state"


@register
class ShowTell(CaptionModel):
    arch = "basic"
    feature_kind = "pooled"

    def __init__(self, cfg: ShowTellConfig) -> None:
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}")
        if cfg.condition not in ("first-step", "init-state"):
            raise ValueError(f"unknown condition {cfg.condition!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)  # W_e
        self.dropout = nn.Dropout(cfg.dropout)
        self.rnn = CELLS[cfg.cell](cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        if cfg.condition == "first-step":
            self.image_embed = nn.Linear(cfg.feature_dim, cfg.embed_dim)  # W_I
        else:
            self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
            self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)  # W_o

    @classmethod
    def from_config(cls, cfg: dict) -> ShowTell:
        return cls(ShowTellConfig(**cfg))

    def config_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self.cfg)}

    @property
    def _lstm(self) -> bool:
        return self.cfg.cell == "lstm"

    # Hidden state is kept batch-first, (B, 1, H), so decoding can index it like any other tensor.
    def _pack(self, hidden) -> State:
        if self._lstm:
            h, c = hidden
            return (h.transpose(0, 1), c.transpose(0, 1))
        return (hidden.transpose(0, 1),)

    def _unpack(self, state: State):
        if self._lstm:
            return (state[0].transpose(0, 1).contiguous(), state[1].transpose(0, 1).contiguous())
        return state[0].transpose(0, 1).contiguous()

    def _initial_hidden(self, features: torch.Tensor):
        """Hidden state after seeing the image: (B, D) pooled features -> RNN hidden."""
        if self.cfg.condition == "init-state":
            h = torch.tanh(self.init_h(features)).unsqueeze(0)  # (1, B, H)
            return (h, torch.tanh(self.init_c(features)).unsqueeze(0)) if self._lstm else h
        x_img = self.dropout(self.image_embed(features)).unsqueeze(1)  # x_{-1}: (B, 1, E)
        _, hidden = self.rnn(x_img)
        return hidden

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing: features (B, D), captions (B, T) -> logits (B, T-1, V) for captions[:, 1:]."""
        x = self.dropout(self.embed(captions[:, :-1]))  # (B, T-1, E): <start> w_1 .. w_n
        if self.cfg.condition == "first-step":
            x = torch.cat([self.dropout(self.image_embed(features)).unsqueeze(1), x], 1)  # (B, T, E)
            hidden = None
        else:
            hidden = self._initial_hidden(features)
        packed = nn.utils.rnn.pack_padded_sequence(
            x, (lengths - 1 + (self.cfg.condition == "first-step")).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed, hidden)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, T', H)
        if self.cfg.condition == "first-step":
            h = h[:, 1:]  # the image step predicts nothing
        return self.out(self.dropout(h)), None  # (B, T-1, V)

    def init_state(self, features: torch.Tensor) -> State:
        return self._pack(self._initial_hidden(features))

    def step(self, tokens: torch.Tensor, state: State):
        x = self.embed(tokens).unsqueeze(1)  # (B, 1, E)
        out, hidden = self.rnn(x, self._unpack(state))
        logits = self.out(out.squeeze(1))  # (B, V)
        return torch.log_softmax(logits.float(), -1), self._pack(hidden), None

    def for_search(self, matmul: str) -> SearchShowTell | None:
        return SearchShowTell(self, matmul) if self._lstm else None


class SearchShowTell:
    """Show and Tell for the caption search only: the model's equations, regrouped; built from its modules.

    W_e S_t's share of the LSTM's input product, with both biases, is a table with a row per word; W_o h_t and,
    for the next step, the LSTM's W_hh h_t are one matrix product, in ``matmul`` arithmetic (:class:`PackedLinear`).
    The image step (x_{-1} = W_I f through the LSTM from a zero state, or h_0 = tanh(W_h f), c_0 = tanh(W_c f))
    runs once per image, through the model itself.
    State: (h, c, W_hh h), all per hypothesis.
    """

    image_slots = 0

    def __init__(self, model: ShowTell, matmul: str) -> None:
        self.model = model  # for the image step, once per image
        lstm = LSTMWeights.of(model.rnn)
        W_o, b_o = model.out.weight.detach().float(), model.out.bias.detach().float()
        self.V = len(W_o)
        self.word_gates = model.embed.weight.detach().float() @ lstm.W_ih.t() + lstm.b_ih + lstm.b_hh  # (V, 4H)
        self.of_h = PackedLinear(torch.cat([W_o, lstm.W_hh]), torch.cat([b_o, torch.zeros(len(lstm.W_hh))]),
                                 matmul)  # h -> [W_o h + b_o; W_hh h]: (V + 4H)

    def init_state(self, features: torch.Tensor) -> State:
        """(B, D) pooled features -> the state after seeing the image."""
        with torch.no_grad():
            h, c = (x[0].float() for x in self.model._initial_hidden(features.float()))  # (B, H) each
        return (h, c, self.of_h(h)[:, self.V:])

    def step(self, tokens: torch.Tensor, state: State):
        h, c, hh = state
        h, c = lstm_update(self.word_gates[tokens] + hh, c)
        of_h = self.of_h(h)
        return torch.log_softmax(of_h[:, : self.V], -1), (h, c, of_h[:, self.V:]), None
