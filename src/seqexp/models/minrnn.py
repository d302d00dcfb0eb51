"""minGRU and minLSTM (Feng et al., 2024, "Were RNNs All We Needed?"): recurrences that train in
parallel over time.

A GRU's or LSTM's gates read the previous state, so step t must wait for step t-1. The minimal
versions read only the input:

    minGRU:  z_t = sigmoid(W_z x_t),  h~_t = g(W_h x_t)
             h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
    minLSTM: f_t = sigmoid(W_f x_t), i_t = sigmoid(W_i x_t), h~_t = g(W_h x_t)
             h_t = f'_t * h_{t-1} + i'_t * h~_t,  f' = f / (f + i), i' = i / (f + i)

Both are h_t = a_t * h_{t-1} + b_t with a_t, b_t known for every t at once: a linear recurrence,
computed for all t by a scan. Three ways, `model.scan`:

- "parallel" (default; `chunked_scan`): in linear space, in chunks of C steps (`chunk_size`: 32,
  or the whole sequence once a step's (B, H) is large). All chunks run their C steps at once from
  a zero state, a loop over the T/C chunks carries the state into each, and all chunks run again
  from it: ~2C + T/C tensor ops instead of T, the same multiply-adds as the step loop (its
  rounding, ~1e-7), and only products of a's -- no division by a cumulative product, which
  underflows (a = 0.01 over 16 steps is 1e-32) and blows up b / prod(a) formulations. Its
  backward is the same scan run backward in time (a custom autograd Function).
- "log" (`log_scan`): Heinsen's (2023) log-space scan, the paper's. g(x) = x + 0.5 for x >= 0,
  sigmoid(x) below, keeps h~ (and so h) positive, so
      log h_t = a*_t + logcumsumexp_{s<=t}(log b_s - a*_s),   a*_t = sum_{s<=t} log a_s
  in chunks of LOG_SCAN_CHUNK steps, which bounds its rounding error (gradients ~1e-5).
  A handful of tensor ops whatever T: for a device where each op has a high fixed cost and
  logcumsumexp is parallel (CUDA), not measured yet.
- "sequential" (`sequential_scan`): the plain loop h = a * h + b, T steps. Sampling (one token
  at a time) always uses it: O(1) per token.

A carried state h_0 enters linearly, h_t = A_t * h_0 + (the scan from zero), A_t = prod a_s: the
state is a hidden state, not a pre-activation, so it is never passed through g() or log g() (the
mistake that made parallel and sequential outputs differ in lucidrains/minGRU-pytorch#9), and
any h_0 -- zero, or one carried from the previous chunk -- gives the sequential loop's result.
The same formula carries the state from one scan chunk to the next.

Speed on CPU (1 thread; forward + backward of one scan, (B, T, 256) fp32): the chunked scan
costs ~15-25 ns per element at (1, 2048), (4, 512), (16, 128) and (64, 1000); the log-space one
~120 (torch's CPU logcumsumexp alone is 20-65 ns per element, and its backward runs it twice
more, with flips); the step loop ~20 at B = 64 but 70-200 at B <= 4, where its T tiny ops are
all overhead. Whole models (benchmarks/minrnn_throughput.py, README): the bare 2 x 256 minGRU
trains 2.6x / 5.0x / 11.7x the tokens/s of nn.GRU at T = 128 / 512 / 2048 with this scan, 0.8x /
1.8x / 3.7x with the log-space one; a bidirectional 2 x 256 IMDB step (64 x 1000) 2.5-3.3x
faster than with the log-space scan, which leaves the projections' matmuls as the main cost.

Layers are wrapped the way the paper's language model wraps them (`blocks=True`), so the
comparison with the Transformer is fair: pre-norm, residual, a feed-forward after each
recurrence, a final norm. `blocks=False` is the bare stack: embedding, recurrent layers, head.

Tasks, as in recurrent.py:
- "lm": causal; the last state of every layer is returned, (layers, B, H) float32 like torch's
  RNN states (batch on dim 1: `state_batch_dim`), and carried into the next chunk.
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

# How training and evaluation run the recurrence (module docstring): "parallel" the chunked
# linear-space scan, "log" Heinsen's log-space scan, "sequential" the step loop.
Scan = Literal["parallel", "log", "sequential"]

# Steps per chunk of the log-space scan. Its error grows with the cumulative log-decay a*_t it
# adds and subtracts, so with the chunk's length: against a float64 step loop, gradients are off by
# ~1e-5 of their scale with chunks of 16 (~1e-4 with 64, ~2e-3 with 256), outputs by ~1e-6 (one
# scan over 2048 steps: 4e-4). Across chunks the state is carried exactly, in linear space, and
# the cost hardly depends on the chunk (logcumsumexp's work is the same).
LOG_SCAN_CHUNK = 16


# ----------------------------------------------------------------------------- the paper's g()
def g(x: torch.Tensor) -> torch.Tensor:
    """Candidate state activation: positive everywhere, linear (not saturating) above 0."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x) without forming g(x). relu keeps the unused branch's log finite: torch.where
    differentiates both branches, and a NaN there would leak into the gradient."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# ----------------------------------------------------------------------------- the scans
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


def chunk_size(B: int, T: int, H: int) -> int:
    """Steps per chunk of `chunked_scan`, measured on CPU (1 thread, fwd + bwd, ns per element).
    The scan issues ~4 tensor ops per step of a chunk and 1 per chunk, each costing ~5 us of
    overhead plus its (B, chunks, H) elements: 32 steps (about sqrt(T) at 512-2048) was best or
    within noise of it from (1, 2048) to (32, 1000) x 256 (16 and 64: up to 1.5x slower at
    the ends; 8: 1.3-1.7x). Once one step of a row, (B, H), has >= 16K elements the overhead is
    amortised anyway and one chunk (the plain loop, no second pass) was ~1.3x faster (IMDB's
    64 x 256)."""
    return T if B * H >= 16384 else 32


def _chunk_steps(T: int, C: int, N: int, j: int, reverse: bool) -> tuple[slice, slice]:
    """Step j of every chunk of C steps: the times (a strided slice of 0..T-1) and the chunks they
    belong to (a slice of 0..N-1). Chunks start at 0 (forward) or end at T - 1 (reverse), so the
    short chunk comes last in scan order and simply drops out of the last steps."""
    n = -(-(T - j) // C)  # chunks that have a step j
    if reverse:  # step j counted from each chunk's end
        return slice((T - 1 - j) % C, T - j, C), slice(N - n, N)
    return slice(j, T, C), slice(0, n)


def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], C: int, reverse: bool,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t (reverse: a_t * h_{t+1} + b_t) for a, b (B, T, H) (any strides),
    without autograd, in C + C + T/C tensor ops instead of T:
    1. every chunk from a zero state at once (a loop over its C steps, each op on (B, N, H)),
       keeping only its end state and its decay prod(a) -- small (B, N, H) buffers;
    2. the state entering each chunk, a loop over the N chunks;
    3. every chunk again from its true entering state, written to `out`.
    Only products of a's and sums, never a division by a product: a products' underflow to 0
    (a ~ 0.01 over 16 steps is 1e-32) is what the recurrence computes, not an error. C >= T: the
    plain step loop (3. alone)."""
    B, T, H = b.shape
    C = min(C, T)
    N = -(-T // C)
    h = b.new_zeros(B, H) if h0 is None else h0
    if N > 1:
        end, decay = b.new_zeros(B, N, H), b.new_ones(B, N, H)
        for j in range(C):
            ts, ks = _chunk_steps(T, C, N, j, reverse)
            a_j = a[:, ts]  # (B, n, H)
            end[:, ks].mul_(a_j).add_(b[:, ts])
            decay[:, ks].mul_(a_j)
        h_in = torch.empty_like(end)  # (B, N, H): the state entering each chunk
        for k in reversed(range(N)) if reverse else range(N):
            h_in[:, k] = h
            h = torch.addcmul(end[:, k], decay[:, k], h)
    else:
        h_in = h[:, None]  # (B, 1, H)
    out = torch.empty_like(b, memory_format=torch.contiguous_format) if out is None else out
    prev, prev_ks = h_in, slice(0, N)
    for j in range(C):
        ts, ks = _chunk_steps(T, C, N, j, reverse)
        # the previous step of the same chunks (h_in at j = 0); a step has at most the previous one's chunks
        p = prev[:, ks.start - prev_ks.start: ks.stop - prev_ks.start]
        torch.addcmul(b[:, ts], a[:, ts], p, out=out[:, ts])
        prev, prev_ks = out[:, ts], ks
    return out


class _ChunkedScan(torch.autograd.Function):
    """`_linear_scan` with its gradient, which is the same scan run backward in time:
    g_t = dL/dh_t (total) = gh_t + a_{t+1} g_{t+1};  dL/db_t = g_t,  dL/da_t = g_t h_{t-1},
    dL/dh0 = a_0 g_0. Autograd through the chunk loops would record ~5 ops per step and
    re-materialise every strided slice; this saves a and h and costs two scans and one product."""

    @staticmethod
    def forward(ctx, a, b, h0, C):
        h = _linear_scan(a, b, h0, C, reverse=False)
        ctx.save_for_backward(a, h, h0)
        ctx.C = C
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h, h0 = ctx.saved_tensors
        g = torch.empty_like(h)  # (B, T, H)
        g[:, -1] = gh[:, -1]
        if h.shape[1] > 1:  # g_{:T-1} from g_{T-1}, with coefficients a_{1:}: views, no copies
            _linear_scan(a[:, 1:], gh[:, :-1], g[:, -1], ctx.C, reverse=True, out=g[:, :-1])
        ga = gh0 = None
        if ctx.needs_input_grad[0]:
            ga = torch.empty_like(g)
            torch.mul(g[:, 1:], h[:, :-1], out=ga[:, 1:])
            ga[:, 0] = 0 if h0 is None else g[:, 0] * h0
        if h0 is not None and ctx.needs_input_grad[2]:
            gh0 = a[:, 0] * g[:, 0]
        return ga, g, gh0, None


def chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor],
                 chunk: Optional[int] = None) -> torch.Tensor:
    """The recurrence in linear space, in chunks of `chunk` steps (default: `chunk_size`).
    a, b (B, T, H) with 0 <= a <= 1; h0 (B, H) or None (zeros) -> h (B, T, H)."""
    return _ChunkedScan.apply(a, b, h0, chunk or chunk_size(*b.shape))


def log_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: Optional[torch.Tensor],
             chunk: int = LOG_SCAN_CHUNK) -> torch.Tensor:
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
        self.cell, self.hidden = cell, hidden
        # gate(s) and candidate from the input alone: (z, h~) or (f, i, h~)
        self.proj = nn.Linear(d_in, (2 if cell == "gru" else 3) * hidden)

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None, scan: Scan = "parallel") -> torch.Tensor:
        # Float32 from the pre-activations on, autocast off. A state is a sum over hundreds of
        # steps of decayed inputs: bf16's 8-bit mantissa would round every step's update by up to
        # 0.4%, and the log-space scan adds and subtracts cumulative log-decays of tens of nats
        # (a log-decay of 20 known to +-0.08: states off by ~8%; fp16's exp() overflows past 11).
        # The state also crosses chunks and goes into checkpoints, where fp32 keeps a resume exact
        # whatever trainer.precision is.
        pre = self.proj(x).float()  # (B, T, 2H | 3H)
        with torch.autocast(x.device.type, enabled=False):
            if scan == "log":
                return log_scan(*self.log_coefficients(pre), h0)
            a, b = self.coefficients(pre)
            return sequential_scan(a, b, h0) if scan == "sequential" else chunked_scan(a, b, h0)

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
                scan: Scan) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (y (B, T, D | H * dirs), the forward direction's last state (B, H)).
        rev: reverse_index (B, T) for the backward direction, or None (forward only)."""
        u = self.ln1(x) if self.blocks else x
        h = self.rnns[0](u, h0, scan)  # (B, T, H) float32
        last = h[:, -1]
        if rev is not None:  # backward: each row reversed within its length, run, put back
            h = torch.cat([h, flip(self.rnns[1](flip(u, rev), None, scan), rev)], dim=-1)  # (B, T, 2H)
        if not self.blocks:
            return self.drop(h), last  # dropout between layers and before the head, as torch's stacks
        x = x + self.drop(self.out(h))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, last


# ----------------------------------------------------------------------------- the model
class MinRNNModel(SequenceModel):
    # The trainer carries the state across chunks (truncated BPTT), as for the fused RNNs.
    stateful = True
    state_batch_dim = 1  # (layers, B, H), as torch's RNN states

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
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
        scan: Scan = "parallel",  # how training/evaluation run the recurrence (module docstring)
    ):
        super().__init__()
        assert head in ("lm", "classify"), head
        self.lm, self.pooling, self.scan = head == "lm", str(pooling), str(scan)
        self.word_dropout = float(word_dropout)
        self.bidirectional = bool(bidirectional) and head == "classify"
        dirs = 2 if self.bidirectional else 1
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        # a bare layer's output is its directions side by side; a block's is the residual stream
        width = [hidden_size if blocks or i == 0 else hidden_size * dirs for i in range(num_layers + 1)]
        self.layers = nn.ModuleList(Layer(str(cell), width[i], hidden_size, dirs, blocks, mlp_ratio, dropout)
                                    for i in range(num_layers))
        out_dim = width[-1]
        self.norm = nn.LayerNorm(out_dim) if blocks else nn.Identity()
        if head == "lm":
            self.head = nn.Linear(out_dim, num_outputs)
            if tie_weights:  # out_dim == hidden_size == the embedding's width
                self.head.weight = self.embed.weight
            return
        self.pool = MaskedPooling(self.pooling, out_dim)
        # last + bidirectional: the final position (the forward direction has read everything)
        # and position 0 (so has the backward one)
        self.head = nn.Linear(out_dim * (2 if self.bidirectional and self.pooling == "last" else 1), num_outputs)

    @classmethod
    def describe(cls, m: dict) -> str:
        bi = "Bi-" if m["bidirectional"] else ""
        per = " per direction" if bi else ""
        kind = "blocks" if m["blocks"] else "bare"  # the paper's (norm, residual, feed-forward) or the bare stack
        return f"{bi}min{m['cell'].upper()} {m['num_layers']} x {m['hidden_size']}{per} ({kind}), {m['pooling']} pooling"

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        check_positive(cfg, "hidden_size", "num_layers", "mlp_ratio")
        check_fraction(cfg, "dropout", "word_dropout")
        require(not (cfg.bidirectional and head == "lm"), "model.bidirectional=true lets a language model see "
                "the next character; use it only with a classification dataset (data=imdb).")

    def input_embedding(self) -> nn.Module:
        return self.embed  # (B, T, H)

    def state_size(self, seq_len: int) -> int:
        """layers x hidden per direction, whatever the length: minLSTM has no cell besides h."""
        dirs = 2 if self.bidirectional else 1
        return len(self.layers) * dirs * self.layers[0].rnns[0].hidden

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                state: Optional[torch.Tensor] = None):
        """tokens (B, T) -> (logits, state). lm: (B, T, V) and the layers' last states
        (layers, B, H) float32; classify: (B, C) and None. `state` as returned, or None (zeros)."""
        B, T = tokens.shape
        # one token (sampling) costs O(1) with the loop; the scan's set-up would be pure overhead
        scan = "sequential" if T == 1 else self.scan
        x = self.drop(embed_words(self.embed, tokens, self.word_dropout))  # (B, T, H)
        if self.lm:
            last = []
            for i, layer in enumerate(self.layers):
                x, h = layer(x, None if state is None else state[i], None, scan)
                last.append(h)
            return self.head(self.norm(x)), torch.stack(last)  # (B, T, V), (L, B, H)

        lengths = lengths_or_full(tokens, lengths)
        rev = reverse_index(lengths, T) if self.bidirectional else None
        for layer in self.layers:
            x, _ = layer(x, None, rev, scan)
        x = self.norm(x)  # (B, T, D); garbage at padded positions only
        pooled = self.pool(x, lengths)  # (B, D)
        if self.bidirectional and self.pooling == "last":
            pooled = torch.cat([pooled, x[:, 0]], dim=-1)  # (B, 2D)
        return self.head(pooled), None
