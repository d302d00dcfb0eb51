"""minGRU and minLSTM (Feng et al., 2024, "Were RNNs All We Needed?"): recurrences that train in
parallel over time.

A GRU's or LSTM's gates read the previous state, so step t must wait for step t-1. The minimal
versions read only the input:

    minGRU:  z_t = sigmoid(W_z x_t),  h~_t = g(W_h x_t)
             h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
    minLSTM: f_t = sigmoid(W_f x_t), i_t = sigmoid(W_i x_t), h~_t = g(W_h x_t)
             h_t = f'_t * h_{t-1} + i'_t * h~_t,  f' = f / (f + i), i' = i / (f + i)

Both are h_t = a_t * h_{t-1} + b_t with a_t, b_t known for every t at once: a linear recurrence,
computed for all t by a scan. g(x) = x + 0.5 for x >= 0, sigmoid(x) below, keeps h~ (and so h)
positive, so the scan can run in log space (Heinsen, 2023):

    log h_t = a*_t + logcumsumexp_{s<=t}(log b_s - a*_s),   a*_t = sum_{s<=t} log a_s

Training and evaluation use that scan (`parallel_scan`, over chunks of SCAN_CHUNK steps, which
bounds its rounding error); sampling (one token at a time) and `scan="sequential"` use the plain
loop h = a * h + b (`sequential_scan`), O(1) per token.

A carried state h_0 enters linearly, h_t = A_t * h_0 + (the scan from zero), A_t = prod a_s: the
state is a hidden state, not a pre-activation, so it is never passed through g() or log g() (the
mistake that made parallel and sequential outputs differ in lucidrains/minGRU-pytorch#9), and
any h_0 -- zero, or one carried from the previous chunk -- gives the sequential loop's result.
The same formula carries the state from one scan chunk to the next.

Speed (benchmarks/minrnn_throughput.py): on CPU torch's logcumsumexp is slow (its backward runs
it twice more, with flips), so the step loop is faster than this scan at 128-2048 steps; the
scan is for devices with a parallel logcumsumexp (CUDA; not measured yet).

Layers are wrapped the way the paper's language model wraps them (`blocks=True`), so the
comparison with the Transformer is fair: pre-norm, residual, a feed-forward after each
recurrence, a final norm. `blocks=False` is the bare stack: embedding, recurrent layers, head.

Tasks, as in recurrent.py:
- "lm": causal; the last state of every layer is returned, (layers, B, H) float32 like torch's
  RNN states (batch on dim 1: distributed.STATE_BATCH_DIM), and carried into the next chunk.
- "classify": the forward direction is causal, so padding after a sequence never reaches its
  valid positions; the backward direction reads each sequence reversed within its own length
  (recurrent.reverse_index/flip); valid positions are pooled (layers.MaskedPooling).

Precision: the recurrence -- gates, g(), the scan and the carried state -- is computed in float32
even under autocast (see `MinRNN.forward`); the projections and feed-forwards around it follow
autocast.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqexp.errors import require
from seqexp.models.base import Pooling, SequenceModel, check_fraction, check_positive
from seqexp.models.layers import MaskedPooling, embed_words, lengths_or_full
from seqexp.models.recurrent import flip, reverse_index

# Steps per chunk of the log-space scan. Its error grows with the cumulative log-decay a*_t it
# adds and subtracts, so with the chunk's length: against a float64 step loop, gradients are off by
# ~1e-5 of their scale with chunks of 16 (~1e-4 with 64, ~2e-3 with 256), outputs by ~1e-6 (one
# scan over 2048 steps: 4e-4). Across chunks the state is carried exactly, in linear space, and
# the cost hardly depends on the chunk (logcumsumexp's work is the same).
SCAN_CHUNK = 16


# ----------------------------------------------------------------------------- the paper's g()
def g(x: torch.Tensor) -> torch.Tensor:
    """Candidate state activation: positive everywhere, linear (not saturating) above 0."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x) without forming g(x). relu keeps the unused branch's log finite: torch.where
    differentiates both branches, and a NaN there would leak into the gradient."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# ----------------------------------------------------------------------------- the two scans
def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t, one step at a time. a, b (B, T, H); h0 (B, H) or None (zeros)
    -> h (B, T, H)."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    # unbind, not a[:, t]: each indexing's backward would write a zero gradient the size of the
    # whole (B, T, H) tensor, O(T^2) (as packed sequences cost torch's CPU RNNs, recurrent.py)
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # (B, H) each
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, dim=1)


def parallel_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: Optional[torch.Tensor],
                  chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """The same recurrence from log a, log b (B, T, H): Heinsen's log-space scan within chunks of
    `chunk` steps (all chunks at once), then a short loop over chunks that carries the state
    exactly. h0 (B, H) or None (zeros) -> h (B, T, H)."""
    B, T, H = log_b.shape
    C = min(chunk, T)
    N = -(-T // C)  # chunks
    pad = N * C - T
    if pad:  # past the end: a = 1, b ~ 0 (finite: logcumsumexp's gradient dislikes -inf); dropped below
        log_a = F.pad(log_a, (0, 0, 0, pad), value=0.0)
        log_b = F.pad(log_b, (0, 0, 0, pad), value=-1e4)
    log_a, log_b = log_a.reshape(B, N, C, H), log_b.reshape(B, N, C, H)
    a_star = log_a.cumsum(2)  # (B, N, C, H): log of the decay since the chunk's start
    local = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=2))  # (B, N, C, H), from h = 0
    decay = torch.exp(a_star)  # (B, N, C, H): how much of the state at the chunk's start survives
    # the state entering each chunk: h_in[n] = decay over chunk n-1 * h_in[n-1] + local end of n-1
    # (unbind, as in sequential_scan: O(N), not O(N^2))
    h = torch.zeros_like(log_b[:, 0, 0]) if h0 is None else h0  # (B, H)
    carried = []
    for d, e in zip(decay[:, :, -1].unbind(1), local[:, :, -1].unbind(1)):  # (B, H) each
        carried.append(h)
        h = d * h + e
    h_in = torch.stack(carried, dim=1)  # (B, N, H)
    out = local + decay * h_in[:, :, None]  # (B, N, C, H)
    return out.reshape(B, N * C, H)[:, :T]


# ----------------------------------------------------------------------------- one recurrence
class MinRNN(nn.Module):
    """One direction of one minGRU or minLSTM layer: x (B, T, D) -> h (B, T, H), float32."""

    def __init__(self, cell: str, d_in: int, hidden: int):
        super().__init__()
        self.cell = cell
        # gate(s) and candidate from the input alone: (z, h~) or (f, i, h~)
        self.proj = nn.Linear(d_in, (2 if cell == "gru" else 3) * hidden)

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None, sequential: bool = False) -> torch.Tensor:
        # Float32 from the pre-activations on, autocast off. The log-space scan adds and subtracts
        # cumulative log-decays of tens of nats within a chunk: bf16 keeps 8 bits of mantissa, so
        # a log-decay of 20 would be known to +-0.08 and every state off by ~8%; fp16's exp()
        # overflows past 11 nats. The state also crosses chunks and goes into checkpoints, where
        # fp32 keeps a resume exact whatever trainer.precision is.
        pre = self.proj(x).float()  # (B, T, 2H | 3H)
        with torch.autocast(x.device.type, enabled=False):
            if sequential:
                return sequential_scan(*self.coefficients(pre), h0)
            return parallel_scan(*self.log_coefficients(pre), h0)

    def coefficients(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, .) pre-activations -> a, b (B, T, H) of h_t = a_t * h_{t-1} + b_t."""
        if self.cell == "gru":
            k, cand = pre.chunk(2, dim=-1)
            z = torch.sigmoid(k)
            return 1 - z, z * g(cand)
        kf, ki, cand = pre.chunk(3, dim=-1)
        f, i = torch.sigmoid(kf), torch.sigmoid(ki)
        # normalised so that f' + i' = 1: the state's scale cannot drift with time (the paper's
        # time-independent minLSTM)
        return f / (f + i), i / (f + i) * g(cand)

    def log_coefficients(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same a, b as log a, log b, from softplus (log sigmoid(k) = -softplus(-k)), never
        the log of a sigmoid that has underflowed to 0."""
        if self.cell == "gru":
            k, cand = pre.chunk(2, dim=-1)
            return -F.softplus(k), -F.softplus(-k) + log_g(cand)  # log(1 - z), log z + log g(h~)
        kf, ki, cand = pre.chunk(3, dim=-1)
        d = F.softplus(-kf) - F.softplus(-ki)  # log i - log f
        return -F.softplus(d), -F.softplus(-d) + log_g(cand)  # log f', log i' + log g(h~)


# ----------------------------------------------------------------------------- one layer
class Layer(nn.Module):
    """One recurrent layer, both directions when bidirectional.

    blocks=True (the paper's LM): x + Out(MinRNN(LN(x))), then x + MLP(LN(x)); the output
    projection mixes the directions and lets the positive states add signed updates to the
    residual stream. blocks=False: the recurrence alone, directions concatenated."""

    def __init__(self, cell: str, d_in: int, hidden: int, dirs: int, blocks: bool, mlp_ratio: int, dropout: float):
        super().__init__()
        self.blocks = blocks
        self.rnns = nn.ModuleList(MinRNN(cell, d_in, hidden) for _ in range(dirs))  # [forward, backward]
        self.drop = nn.Dropout(dropout)
        if blocks:
            self.ln1, self.ln2 = nn.LayerNorm(d_in), nn.LayerNorm(d_in)
            self.out = nn.Linear(hidden * dirs, d_in)
            self.mlp = nn.Sequential(nn.Linear(d_in, mlp_ratio * d_in), nn.GELU(), nn.Linear(mlp_ratio * d_in, d_in))

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor], rev: Optional[torch.Tensor],
                sequential: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (y (B, T, D | H * dirs), the forward direction's last state (B, H)).
        rev: reverse_index (B, T) for the backward direction, or None (forward only)."""
        u = self.ln1(x) if self.blocks else x
        h = self.rnns[0](u, h0, sequential)  # (B, T, H) float32
        last = h[:, -1]
        if rev is not None:  # backward: each row reversed within its length, run, put back
            h = torch.cat([h, flip(self.rnns[1](flip(u, rev), None, sequential), rev)], dim=-1)  # (B, T, 2H)
        if not self.blocks:
            return self.drop(h), last  # dropout between layers and before the head, as torch's stacks
        x = x + self.drop(self.out(h))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, last


# ----------------------------------------------------------------------------- the model
class MinRNNModel(SequenceModel):
    # The trainer carries the state across chunks (truncated BPTT), as for the fused RNNs.
    stateful = True

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        task: str,
        pad_id: int = 0,
        max_len: Optional[int] = None,  # unused: recurrence has no context limit
        cell: Literal["gru", "lstm"] = "gru",  # minGRU or minLSTM
        hidden_size: int = 256,  # the state's width, and the embedding's and residual stream's
        num_layers: int = 2,
        blocks: bool = True,  # pre-norm residual blocks with a feed-forward (the paper's LM); False: the bare stack
        mlp_ratio: int = 4,  # feed-forward width / hidden_size, as attention's blocks (blocks=True)
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        bidirectional: bool = False,  # classification only: a language model must not see the future
        pooling: Pooling = "last",  # classification only
        tie_weights: bool = False,  # language modelling: one matrix maps ids to vectors and back
        scan: Literal["parallel", "sequential"] = "parallel",  # sequential: the step loop at every length
    ):
        super().__init__()
        assert task in ("lm", "classify"), task
        self.task, self.pooling, self.scan = task, str(pooling), str(scan)
        self.word_dropout = float(word_dropout)
        self.bidirectional = bool(bidirectional) and task == "classify"
        dirs = 2 if self.bidirectional else 1
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        # a bare layer's output is its directions side by side; a block's is the residual stream
        width = [hidden_size if blocks or i == 0 else hidden_size * dirs for i in range(num_layers + 1)]
        self.layers = nn.ModuleList(Layer(str(cell), width[i], hidden_size, dirs, blocks, mlp_ratio, dropout)
                                    for i in range(num_layers))
        out_dim = width[-1]
        self.norm = nn.LayerNorm(out_dim) if blocks else nn.Identity()
        if task == "lm":
            self.head = nn.Linear(out_dim, num_outputs)
            if tie_weights:  # out_dim == hidden_size == the embedding's width
                self.head.weight = self.embed.weight
            return
        self.pool = MaskedPooling(self.pooling, out_dim)
        # last + bidirectional: the final position (the forward direction has read everything)
        # and position 0 (so has the backward one)
        self.head = nn.Linear(out_dim * (2 if self.bidirectional and self.pooling == "last" else 1), num_outputs)

    @classmethod
    def check_config(cls, cfg, task: str) -> None:
        check_positive(cfg, "hidden_size", "num_layers", "mlp_ratio")
        check_fraction(cfg, "dropout", "word_dropout")
        require(not (cfg.bidirectional and task == "lm"), "model.bidirectional=true lets a language model see "
                "the next character; use it only with a classification dataset (data=imdb).")

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                state: Optional[torch.Tensor] = None):
        """tokens (B, T) -> (logits, state). lm: (B, T, V) and the layers' last states
        (layers, B, H) float32; classify: (B, C) and None. `state` as returned, or None (zeros)."""
        B, T = tokens.shape
        # one token (sampling) costs O(1) with the loop; the scan's set-up would be pure overhead
        sequential = self.scan == "sequential" or T == 1
        x = self.drop(embed_words(self.embed, tokens, self.word_dropout))  # (B, T, H)
        if self.task == "lm":
            last = []
            for i, layer in enumerate(self.layers):
                x, h = layer(x, None if state is None else state[i], None, sequential)
                last.append(h)
            return self.head(self.norm(x)), torch.stack(last)  # (B, T, V), (L, B, H)

        lengths = lengths_or_full(tokens, lengths)
        rev = reverse_index(lengths, T) if self.bidirectional else None
        for layer in self.layers:
            x, _ = layer(x, None, rev, sequential)
        x = self.norm(x)  # (B, T, D); garbage at padded positions only
        pooled = self.pool(x, lengths)  # (B, D)
        if self.bidirectional and self.pooling == "last":
            pooled = torch.cat([pooled, x[:, 0]], dim=-1)  # (B, 2D)
        return self.head(pooled), None
