"""Show, Attend and Tell (Xu et al., ICML 2015), the soft (deterministic) attention model.

Annotation vectors a_1..a_L (the CNN grid, L = N regions of dimension D). At each step t:

    e_ti  = w^T tanh(W_a a_i + W_h h_{t-1})           additive attention          (eq. 4)
    α_t   = softmax(e_t)                                                           (eq. 5)
    β_t   = σ(f_β(h_{t-1}))                           gating scalar               (sec. 4.2.1)
    ẑ_t   = β_t Σ_i α_ti a_i                          context vector              (eq. 6, 13)
    h_t, c_t = LSTM([E y_{t-1}; ẑ_t], h_{t-1}, c_{t-1})                             (eq. 1-3)
    p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t))  deep output layer           (eq. 7)

with h_0 = f_init,h(mean_i a_i), c_0 = f_init,c(mean_i a_i) and dropout before L_o. Training adds the
doubly stochastic regulariser λ Σ_i (1 - Σ_t α_ti)^2 (eq. 14), which pushes the model to look at every
region over the course of the caption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import register
from .base import CaptionModel, State
from .packed import LSTMWeights, PackedLinear, lstm_update

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


@dataclass
class ShowAttendTellConfig:
    vocab_size: int
    feature_dim: int  # D
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    cell: str = "lstm"


class SoftAttention(nn.Module):
    """f_att: additive attention of Bahdanau et al. as used by Xu et al. (eq. 4-6)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.W_a = nn.Linear(feature_dim, attention_dim)
        self.W_h = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.w = nn.Linear(attention_dim, 1)

    def project(self, a: torch.Tensor) -> torch.Tensor:
        """W_a a_i for all regions, computed once per image: (B, L, D) -> (B, L, A)."""
        return self.W_a(a)

    def forward(self, a: torch.Tensor, Wa_a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e_ti = w^T tanh(W_a a_i + W_h h_{t-1}) (eq. 4), α_t = softmax(e_t) (eq. 5), context Σ_i α_ti a_i.

        a (B, L, D) and Wa_a = W_a a (B, L, A) are per image; h (B*M, H) holds M hypotheses per image (M beams,
        or 1). The regions are shared by an image's hypotheses, never copied per beam: -> context (B*M, D),
        α (B*M, L).
        """
        B, L, A = Wa_a.shape
        x = (Wa_a.unsqueeze(1) + self.W_h(h).view(B, -1, 1, A)).tanh_()  # (B, M, L, A), in place: no copy
        e = self.w(x).squeeze(3)  # (B, M, L)
        alpha = torch.softmax(e, dim=2)  # (B, M, L)
        context = torch.bmm(alpha, a)  # Σ_i α_ti a_i: (B, M, D)
        return context.flatten(0, 1), alpha.flatten(0, 1)


@register
class ShowAttendTell(CaptionModel):
    arch = "attention"
    feature_kind = "grid"
    image_slots = 2  # a and W_a a: per image, shared by its beams

    def __init__(self, cfg: ShowAttendTellConfig) -> None:
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}")
        self.cfg = cfg
        D, E, H = cfg.feature_dim, cfg.embed_dim, cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, E)  # E
        self.attention = SoftAttention(D, H, cfg.attention_dim)
        self.f_beta = nn.Linear(H, 1)
        self.init_h = nn.Linear(D, H)  # f_init,h
        self.init_c = nn.Linear(D, H)  # f_init,c
        self.cell = CELLS[cfg.cell](E + D, H)
        self.L_h = nn.Linear(H, E)
        self.L_z = nn.Linear(D, E)
        self.L_o = nn.Linear(E, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    @classmethod
    def from_config(cls, cfg: dict) -> ShowAttendTell:
        return cls(ShowAttendTellConfig(**cfg))

    def config_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self.cfg)}

    def _cell(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.cell == "lstm":
            return self.cell(x, (h, c))
        return self.cell(x, h), c  # GRU / plain RNN carry no memory cell

    def _attend(self, a: torch.Tensor, Wa_a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, alpha = self.attention(a, Wa_a, h)
        beta = torch.sigmoid(self.f_beta(h))  # gating scalar: (B, 1)
        return beta * context, alpha  # ẑ_t: (B, D)

    def _deep_output(self, Ey: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.L_o(self.dropout(Ey + self.L_h(h) + self.L_z(z)))  # (..., V)

    def init_state(self, a: torch.Tensor) -> State:
        mean_a = a.mean(1)  # (B, D)
        h, c = torch.tanh(self.init_h(mean_a)), torch.tanh(self.init_c(mean_a))
        return (a, self.attention.project(a), h, c)

    def forward(self, a: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing. a (B, L, D), captions (B, T) -> logits (B, T-1, V), alphas (B, T-1, L).

        Captions are processed longest first so each step runs only on the captions still going.
        """
        B, T = captions.shape
        steps = lengths - 1  # words to predict per caption, <end> included
        order = torch.argsort(steps, descending=True)
        a, captions, steps = a[order], captions[order], steps[order]
        a, Wa_a, h, c = self.init_state(a)
        Ey = self.embed(captions[:, :-1])  # E y_{t-1}: (B, T-1, E)
        hs = a.new_zeros(B, T - 1, h.size(1))
        zs = a.new_zeros(B, T - 1, a.size(2))
        alphas = a.new_zeros(B, T - 1, a.size(1))
        steps_list = steps.tolist()
        for t in range(int(steps_list[0])):
            n = sum(1 for s in steps_list if s > t)  # captions still running at step t
            z, alpha = self._attend(a[:n], Wa_a[:n], h[:n])
            h, c = self._cell(torch.cat([Ey[:n, t], z], 1), h[:n], c[:n])
            hs[:n, t], zs[:n, t], alphas[:n, t] = h, z, alpha
        logits = self._deep_output(Ey, hs, zs)  # (B, T-1, V), one matmul for all steps
        inverse = torch.argsort(order)
        return logits[inverse], alphas[inverse]

    def step(self, tokens: torch.Tensor, state: State):
        a, Wa_a, h, c = state
        Ey = self.embed(tokens)  # (B, E)
        z, alpha = self._attend(a, Wa_a, h)
        h, c = self._cell(torch.cat([Ey, z], 1), h, c)
        logits = self._deep_output(Ey, h, z)  # (B, V)
        return torch.log_softmax(logits.float(), -1), (a, Wa_a, h, c), alpha

    def for_search(self, matmul: str) -> SearchShowAttendTell | None:
        return SearchShowAttendTell(self, matmul) if self.cfg.cell == "lstm" else None

    def regularizer(self, alphas: torch.Tensor | None) -> torch.Tensor:
        """Doubly stochastic attention (eq. 14): Σ_i (1 - Σ_t α_ti)^2, averaged over the batch.

        ``alphas`` (B, T, L) are zero on padded steps, so the sum over time covers real words only.
        """
        return ((1.0 - alphas.sum(1)) ** 2).sum(1).mean()


class SearchShowAttendTell:
    """Show, Attend and Tell for the caption search only: the model's equations, regrouped for a CPU.

    Built from the model's modules (their weights copied in float32, or packed for ``matmul``):

    - E y_{t-1}'s share of the LSTM's input product, with both LSTM biases, is a table with a row per word;
    - the products of h_t are one: L_h h_t (eq. 7) and, for the next step, W_h h_t (eq. 4), f_β(h_t) and the
      LSTM's W_hh h_t; so are the two of ẑ_t (the LSTM's input, and L_z ẑ_t of eq. 7);
    - eq. 4 runs through tanh(x) = 2σ(2x) - 1, so e_ti = w^T tanh(x) + b = 2 w^T σ(2x) + (b - Σ_k w_k): the same
      numbers up to rounding, and on a CPU σ runs this (B, M, L, A) tensor, a beam search's biggest elementwise
      job, 2-5x faster than tanh (measured in float32 and bfloat16). The products are doubled once, here:
      u = 2 W_a a_i (once per image) and v = 2 W_h h (per hypothesis), x = u + v;
    - eq. 4 runs over ``CHUNK`` images at a time, so that its (chunk, M, L, A) block stays in cache, and without
      an exp per element: σ(u + v) = 1 / (1 + e^-u e^-v), so e^-u is kept instead of u. That needs e^-u and
      e^-v in float32's range: |v| <= 2 max_j ||W_h[j]||_1 since |h| < 1, which must be at most ``EXP_V_MAX``
      (53 for the shipped model; else σ it is), and u is clipped to ±80 before its exp, which moves σ(u + v) by
      less than e^-(80 - 60) -- where it is within that of 0 or 1 anyway;
    - matrix products in ``matmul`` arithmetic (:class:`PackedLinear`: float32, bfloat16 or int8), the rest in
      float32; the grid a is kept in bfloat16 unless ``matmul`` is float32.

    State: (a, e^-u (or u), h, c, [2 W_h h; f_β(h); W_hh h]), the last three per hypothesis.
    """

    image_slots = 2
    CHUNK = 16
    EXP_V_MAX = 60.0

    def __init__(self, model: ShowAttendTell, matmul: str) -> None:
        E, A = model.cfg.embed_dim, model.cfg.attention_dim
        self.E, self.A = E, A
        self.grid_dtype = torch.float32 if matmul == "float32" else torch.bfloat16
        att, lstm = model.attention, LSTMWeights.of(model.cell)
        W_ih_y, W_ih_z = lstm.W_ih[:, :E], lstm.W_ih[:, E:]  # the LSTM's input is [E y_{t-1}; ẑ_t]
        W_a, b_a = _f32(att.W_a)
        W_h, _ = _f32(att.W_h)
        w, b_w = _f32(att.w)  # (1, A), (1,)
        (W_ih_h, b_ih_h), (W_ic, b_ic) = _f32(model.init_h), _f32(model.init_c)
        (W_Lh, b_Lh), (W_Lz, b_Lz), (W_b, b_b) = _f32(model.L_h), _f32(model.L_z), _f32(model.f_beta)
        self.embed = model.embed.weight.detach().float()  # (V, E)
        self.word_gates = self.embed @ W_ih_y.t() + lstm.b_ih + lstm.b_hh  # (V, 4H)
        self.W_a = PackedLinear(2 * W_a, 2 * b_a, matmul)  # u = 2 W_a a
        self.init_hc = PackedLinear(torch.cat([W_ih_h, W_ic]), torch.cat([b_ih_h, b_ic]), matmul)  # -> [h_0; c_0]
        self.w = w.t().contiguous()  # (A, 1)
        self.w_bias = float(b_w - w.sum())  # b - Σ_k w_k
        zeros = torch.zeros
        self.of_z = PackedLinear(torch.cat([W_ih_z, W_Lz]), torch.cat([zeros(len(W_ih_z)), b_Lz]), matmul)  # (4H + E)
        self.of_h = PackedLinear(torch.cat([W_Lh, 2 * W_h, W_b, lstm.W_hh]),  # (E + A + 1 + 4H)
                                 torch.cat([b_Lh, zeros(A), b_b, zeros(len(lstm.W_hh))]), matmul)
        self.L_o = PackedLinear(*_f32(model.L_o), matmul)
        self.exp_form = float(2 * W_h.abs().sum(1).max()) <= self.EXP_V_MAX

    def init_state(self, a: torch.Tensor) -> State:
        a = a.float()
        B, L, D = a.shape
        h, c = torch.tanh(self.init_hc(a.mean(1))).chunk(2, 1)
        u = self.W_a(a.reshape(B * L, D)).view(B, L, -1)  # 2 W_a a_i: (B, L, A)
        u = torch.exp(-u.clamp_(-80.0, 80.0)) if self.exp_form else u
        return (a.to(self.grid_dtype), u, h, c, self.of_h(h)[:, self.E:])

    def _alpha(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Eq. 4-5 through σ (see the class): from u (B, L, A) as kept in the state and v = 2 W_h h (B, M, 1, A),
        e = 2 w^T σ(u + v) + (b - Σ_k w_k) (B, M, L) -> α = softmax(e) (B, M, L)."""
        B, L, A = u.shape
        M, n = v.size(1), self.CHUNK
        e = u.new_empty(B, M, L, 1)
        block = u.new_empty(min(n, B), M, L, A)
        if self.exp_form:
            v, one = torch.exp(-v), u.new_ones(())
        for s in range(0, B, n):
            k = min(n, B - s)
            if self.exp_form:  # σ(2x) = 1 / (1 + e^-u e^-v)
                x = torch.addcmul(one, u[s: s + k].unsqueeze(1), v[s: s + k], out=block[:k]).reciprocal_()
            else:
                x = torch.add(u[s: s + k].unsqueeze(1), v[s: s + k], out=block[:k]).sigmoid_()
            torch.matmul(x, self.w, out=e[s: s + k])
        return torch.softmax(e.squeeze(3).mul_(2).add_(self.w_bias), dim=2)

    def step(self, tokens: torch.Tensor, state: State):
        a, u, h, c, of_h = state
        E, A = self.E, self.A
        B = a.size(0)
        alpha = self._alpha(u, of_h[:, :A].reshape(B, -1, 1, A))  # (B, M, L)
        context = torch.bmm(alpha.to(a.dtype), a).flatten(0, 1).float()  # Σ_i α_ti a_i
        z = torch.sigmoid(of_h[:, A: A + 1]) * context  # ẑ_t = β_t Σ_i α_ti a_i
        of_z = self.of_z(z)
        h, c = lstm_update(self.word_gates[tokens] + of_z[:, : -E] + of_h[:, A + 1:], c)
        of_h = self.of_h(h)
        logits = self.L_o(self.embed[tokens] + of_h[:, :E] + of_z[:, -E:])  # eq. 7
        return torch.log_softmax(logits, -1), (a, u, h, c, of_h[:, E:]), alpha.flatten(0, 1)


def _f32(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight (out, in) and bias (out,) as float32 copies, for a twin to regroup."""
    bias = layer.bias.detach().float() if layer.bias is not None else None
    return layer.weight.detach().float(), bias
