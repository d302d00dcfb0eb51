"""Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"): a
recurrence whose decay and read/write vectors depend on the input.

One Mamba mixer, for x (B, T, D) and E = expand * D channels of N states each:

    u, z = in_proj(x)                              # (B, T, E) each
    u = SiLU(causal depthwise conv(u))             # a few positions of local context
    dt = softplus(dt_proj(x_proj(u)) + dt_bias)    # (B, T, E): Δ, a step size per channel (per head: below)
    B_t, C_t = x_proj(u)                           # (B, T, N) each, shared by the channels
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t     # (B, E, N): A (E, N) < 0, diagonal
    y_t = h_t · C_t + D * u_t
    out = out_proj(y * SiLU(z))

A large Δ lets the state forget and take in the current input, a small one lets it ignore it:
selection. `selective=False` makes Δ, B and C learned constants (dt_bias, B, C), the same code
with only the input dependence removed: a time-invariant diagonal SSM (S4D-like) as control.
A = -exp(A_log), initialised S4D-real (A_{e,n} = -n, n = 1..N), D = 1, and dt_bias the inverse
softplus of a Δ drawn log-uniformly in [1e-3, 1e-1], as the paper.

The scan (`selective_scan`): h_t has E*N numbers per row, 16x the layer's width, and on a CPU
the cost is moving them through memory. Three forms, forward + backward of the scan alone on 1
thread (`OMP_NUM_THREADS=1 python benchmarks/ssm_scans.py`, paired rounds on a shared 2-core
machine under load, so +-50%; ns per state element at B x T x E x N = 8 x 256 x 256 x 16 and
32 x 128 x 512 x 16):
- this one, fused and chunked: 9-20 and 8-27;
- exp(Δ A) and Δ B u materialised as (B, T, E, N) tensors and run through minGRU's chunked scan
  (models/minrnn.py): 31-70 and 30-59, with ~5 such tensors alive (IMDB's 64 x 1000 x 512 x 16:
  2 GB each);
- Mamba-2's chunked SSD form: 530-1060 (small shape only). With a decay per (channel, state) its
  within-chunk decay matrix is (Q, Q, E, N), not (Q, Q) per head, Q times the state's memory;
  its matmul form needs Mamba-2's scalar A per head: the `head_dim` option below.
So: time in chunks of Q steps (SCAN_CHUNK); per chunk exp(Δ A) and Δ B u for all Q steps at once,
then Q in-place multiply-adds for the states (each over B x E x N >= 16K elements, where minrnn
measured the plain step loop fastest), then every y_t at once. Only the state entering each chunk
is kept; the backward recomputes the chunk's states from it (as Mamba's CUDA kernel does) and runs
the same chunks in reverse. Memory: O(B T E + B T E N / Q) instead of O(B T E N).

`head_dim=P` (Mamba-2, Dao & Gu 2024): Δ and the decay A become one scalar per head of P channels
(A (H,), initialised uniform in [1, 16] as Mamba-2; Δ's projection ends in H outputs). The state
is the same E x N per row, but within a head every channel decays alike, so a chunk of Q steps is
two (Q, Q) x (Q, P) matmuls per head (`ssd_scan`, the state-space duality) instead of Q passes over
the state. Scan alone, same command and shapes: 1.9 and 2.2 ns per state element at P = 64, Q = 32
(Q = 16: 2.2 / 3.8; 64: 2.4 / 4.5), against the fused scan's best 5.2 and 7.3 in the same run (a
machine loaded by two training runs). What a decay per channel buys, and what sharing it costs, is
measured in BENCHMARKS.md, not assumed; the default stays the Mamba-1 layer.

One token at a time (sampling) takes the plain step loop (`sequential_scan`; with heads, each
head's Δ and A repeated over its channels). The carried state of each layer is its convolution
tail and its SSM state (B, E, N), both float32, with or without heads.

Blocks are pre-norm residual (RMSNorm), with no feed-forward: a Mamba block is the paper's whole
layer (its in/out projections hold the parameters a Transformer's MLP would). Classification as in
minrnn.py: the forward direction is causal, so padding after a sequence never reaches it; a
bidirectional block adds a second mixer that reads each sequence reversed within its own length;
valid positions are pooled (layers.MaskedPooling).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqexp.errors import require
from seqexp.models.base import Pooling, check_fraction, check_positive
from seqexp.models.mixer_stack import MixerStack
from seqexp.models.recurrent import flip
from seqexp.models.segment_sum import segment_sum
from seqexp.models.shortconv import ShortConv

DT_MIN, DT_MAX = 1e-3, 1e-1  # the paper's range for the initial Δ
# Steps per chunk of `selective_scan`. The whole default language model's training step (1 thread,
# 32 x 128 and 8 x 512 tokens) was fastest with 8: 0.99 / 0.86 s, against 1.00 / 0.88 with 4,
# 1.14 / 0.93 with 16, 2.07 / 1.08 with 32; 2 (1.12 / 1.02) keeps too many chunk-entering states.
SCAN_CHUNK = 8
# Steps per chunk of `ssd_scan` (head_dim set): the scan alone was fastest with 32 (module docstring);
# the whole language model's step (1 thread, loaded machine) at 8 x 512, 2 x 256, P = 64: 465 ms
# against 489 (16) and 539 (64); at the lab's 32 x 128, 2 x 64, P = 16: 91 against 82 (16), 130 (64).
SSD_CHUNK = 32
# exp(x) = exp2(x log2 e): torch's float32 exp2 runs ~3x faster than its exp on a CPU (1 thread,
# 512k elements: 0.29 against 0.87 ns each), and exp(Δ A) over every (B, T, E, N) element was a
# quarter of a training step. Relative error against float64 exp <= 2e-6 at |Δ A| = 30, where the
# decay is already e^-30.
LOG2E = 1.4426950408889634

State = tuple[torch.Tensor, torch.Tensor]  # (convolution tail (.., B, K-1, E), SSM state (.., B, E, N))


# ----------------------------------------------------------------------------- the scans
def sequential_scan(dt, u, A, Bm, Cm, h0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = h_t C_t, one step at a time (autograd).
    dt, u (B, T, E); A (E, N); Bm, Cm (B, T, N); h0 (B, E, N) or None (zeros) -> y (B, T, E), h_T."""
    h = u.new_zeros(u.shape[0], *A.shape) if h0 is None else h0
    A2 = A * LOG2E  # exp(dt A) as exp2(dt A log2 e), as the chunked scan computes it
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(1), u.unbind(1), Bm.unbind(1), Cm.unbind(1)):  # (B, E), (B, N)
        h = torch.exp2(dt_t[:, :, None] * A2) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]  # (B, E, N)
        ys.append((h @ c_t[:, :, None]).squeeze(-1))  # (B, E)
    return torch.stack(ys, dim=1), h


def _chunk_states(dA: torch.Tensor, dBu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The states of one chunk, written over dBu: dBu[:, j] <- dA[:, j] * h_{j-1} + dBu[:, j].
    dA, dBu (B, Q, E, N); h (B, E, N) entering -> dBu, now (h_1 .. h_Q)."""
    for j in range(dA.shape[1]):
        h = dBu[:, j].addcmul_(dA[:, j], h)
    return dBu


class _SelectiveScan(torch.autograd.Function):
    """`sequential_scan` in chunks of Q steps, keeping only each chunk's entering state (module
    docstring). Backward, per chunk from the last: recompute its states h_t; the gradient of each
    state, G_t = dL/dh_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1}, runs backward in time. G_t is also
    the gradient of the input term dt_t u_t B_t (u's, dt's and B's share); G_t h_{t-1} exp(dt_t A)
    is the gradient of dt_t A (dt's and A's share); dL/dC_t = gy_t h_t."""

    @staticmethod
    def forward(ctx, dt, u, A, Bm, Cm, h0, Q: int):
        B, T, E = u.shape
        A2 = A * LOG2E  # exp(dt A) = exp2(dt A2) (LOG2E)
        h = u.new_zeros(B, *A.shape) if h0 is None else h0  # (B, E, N)
        du = dt * u  # (B, T, E)
        y, starts = torch.empty_like(du), []
        for c in range(0, T, Q):
            s = slice(c, c + Q)
            starts.append(h)
            dA = torch.exp2(dt[:, s, :, None] * A2)  # (B, Q, E, N)
            H = _chunk_states(dA, du[:, s, :, None] * Bm[:, s, None, :], h)  # (B, Q, E, N)
            h = H[:, -1].clone()
            y[:, s] = (H * Cm[:, s, None, :]).sum(-1)  # (B, Q, E)
        ctx.save_for_backward(dt, u, A, Bm, Cm, torch.stack(starts, dim=1))  # starts (B, T/Q, E, N)
        ctx.Q = Q
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        dt, u, A, Bm, Cm, starts = ctx.saved_tensors
        Q = ctx.Q
        A2 = A * LOG2E
        du = dt * u
        # dL/dh entering the chunk after this one, times its first decay; at the end, h_T's own gradient
        carry = torch.zeros_like(starts[:, 0]) if gh is None else gh.clone()
        gdt, gu, gB, gC = (x.new_empty(x.shape) for x in (dt, u, Bm, Cm))  # contiguous, even for expanded inputs
        gA = torch.zeros_like(A)
        # float32 even if backward() is called under autocast (@ would run in bf16). Contractions
        # as mul + sum where einsum would permute a (B, Q, E, N) copy first (2-15x slower, 1 thread)
        with torch.autocast(u.device.type, enabled=False):
            for k in reversed(range(starts.shape[1])):
                s = slice(k * Q, (k + 1) * Q)
                h_in = starts[:, k]
                dA = torch.exp2(dt[:, s, :, None] * A2)  # (B, Q, E, N), as in forward
                H = _chunk_states(dA, du[:, s, :, None] * Bm[:, s, None, :], h_in)
                gC[:, s] = (gy[:, s, None, :] @ H).squeeze(2)  # (B, Q, N)
                G = gy[:, s, :, None] * Cm[:, s, None, :]  # (B, Q, E, N): from y_t; the future added below
                for j in reversed(range(G.shape[1])):
                    carry = G[:, j].add_(carry) * dA[:, j]
                g_du = (G * Bm[:, s, None, :]).sum(-1)  # (B, Q, E)
                gB[:, s] = (du[:, s, None, :] @ G).squeeze(2)  # (B, Q, N)
                # dL/d(dt A) = G_t * h_{t-1} * dA_t, in place over G (h_{t-1}: the chunk's states shifted by one)
                G[:, 1:].mul_(H[:, :-1])
                G[:, 0].mul_(h_in)
                z = G.mul_(dA)
                gdt[:, s] = (z * A).sum(-1) + g_du * u[:, s]
                gA += (z * dt[:, s, :, None]).sum((0, 1))
                gu[:, s] = g_du * dt[:, s]
        return gdt, gu, gA, gB, gC, (carry if ctx.needs_input_grad[5] else None), None


def selective_scan(dt, u, A, Bm, Cm, h0: Optional[torch.Tensor] = None,
                   chunk: int = SCAN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """What `sequential_scan` computes, in chunks of `chunk` steps.
    dt, u (B, T, E); A (E, N); Bm, Cm (B, T, N); h0 (B, E, N) or None -> y (B, T, E), h_T (B, E, N)."""
    return _SelectiveScan.apply(dt, u, A, Bm, Cm, h0, chunk)


def ssd_scan(dt, u, A, Bm, Cm, h0: Optional[torch.Tensor] = None,
             chunk: int = SSD_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequential_scan` when A is one scalar per head of P = E / H channels, and Δ one per head
    (`head_dim`): Mamba-2's state-space duality (SSD), chunked. Within a chunk of Q steps, per head,
    with L[t, s] = exp(Δ_{s+1} A + ... + Δ_t A) the decay from step s to t and h_0 the state entering,
        y_t = Σ_{s <= t} (C_t·B_s) L[t, s] Δ_s u_s  +  exp(Δ_1 A + ... + Δ_t A) h_0 C_t
    (Q, Q) by (Q, P) matmuls instead of Q steps over the (E, N) states; a loop over the T/Q chunks
    carries the state. Autograd differentiates it (every step a matmul or an elementwise op).
    dt (B, T, H); u (B, T, E); A (H,) < 0; Bm, Cm (B, T, N); h0 (B, E, N) or None -> y (B, T, E), h_T."""
    Bsz, T, E = u.shape
    H, N, Q = A.shape[0], Bm.shape[-1], chunk
    P, pad = E // H, -T % Q
    if pad:  # Δ = 0 past the end: decay 1 and no input, so the state leaves the last step unchanged
        dt, u, Bm, Cm = (F.pad(x, (0, 0, 0, pad)) for x in (dt, u, Bm, Cm))
    c = (T + pad) // Q
    a = (dt * A).view(Bsz, c, Q, H).permute(0, 3, 1, 2)  # (B, H, c, Q): log decay per step
    x = (u.view(Bsz, T + pad, H, P) * dt[..., None]).view(Bsz, c, Q, H, P).permute(0, 3, 1, 2, 4)  # (B, H, c, Q, P)
    Bc, Cc = Bm.view(Bsz, 1, c, Q, N), Cm.view(Bsz, 1, c, Q, N)
    L = torch.exp(segment_sum(a))  # (B, H, c, Q, Q)
    y = ((Cc @ Bc.transpose(-1, -2)) * L) @ x  # (B, H, c, Q, P): within each chunk
    # what each chunk adds to the state at its end: Σ_s L[Q-1, s] x_s B_sᵀ -> (B, H, c, P, N)
    added = (x * L[..., -1, :, None]).transpose(-1, -2) @ Bc
    decay_in = torch.exp(a.cumsum(-1))  # (B, H, c, Q): from the chunk's entering state to step t
    h = u.new_zeros(Bsz, H, P, N) if h0 is None else h0.view(Bsz, H, P, N)
    entering = []
    for k in range(c):
        entering.append(h)
        h = h * decay_in[:, :, k, -1, None, None] + added[:, :, k]
    S = torch.stack(entering, 2)  # (B, H, c, P, N)
    y = y + (Cc @ S.transpose(-1, -2)) * decay_in[..., None]  # the entering states, read through C
    y = y.permute(0, 2, 3, 1, 4).reshape(Bsz, T + pad, E)[:, :T]
    return y, h.reshape(Bsz, E, N)


# ----------------------------------------------------------------------------- one mixer
class Mamba(nn.Module):
    """One Mamba mixer: x (B, T, D) -> (B, T, D), with its state (module docstring)."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int, selective: bool,
                 head_dim: Optional[int]):
        super().__init__()
        E, N = expand * d_model, d_state
        self.selective, self.dt_rank, self.d_state = selective, dt_rank, d_state
        self.head_dim = head_dim
        n_dt = E if head_dim is None else E // head_dim  # Δs and decays: one per channel, or per head
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)  # u and the gate z
        self.conv = ShortConv(E, d_conv, bias=True)
        if selective:
            # Δ through a low-rank bottleneck; nn.Linear's default init, U(+-dt_rank^-0.5), is the paper's
            self.x_proj = nn.Linear(E, dt_rank + 2 * N, bias=False)
            self.dt_proj = nn.Linear(dt_rank, n_dt, bias=False)
        else:
            self.B = nn.Parameter(torch.ones(N))  # S4D's B; C random, as S4D's
            self.C = nn.Parameter(torch.randn(N) / math.sqrt(N))
        dt = torch.exp(torch.empty(n_dt).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        if head_dim is None:  # S4D-real: A_{e,n} = -n
            A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # (E, N)
        else:  # Mamba-2's: one rate per head, uniform in [1, 16]
            A = torch.empty(n_dt).uniform_(1, 16)  # (H,)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log.no_weight_decay = True  # decay rates, not weights: the paper leaves them out (build.decays)
        self.state_numbers = self.conv.state_size() + E * N  # the convolution's tail and h (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def ssm_params(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, T, E) -> Δ (B, T, E or H), B and C (B, T, N): from u, or constants (selective=False)."""
        if not self.selective:
            shape = (u.shape[0], u.shape[1])
            return F.softplus(self.dt_bias).expand(*shape, -1), self.B.expand(*shape, -1), self.C.expand(*shape, -1)
        r, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(r) + self.dt_bias), Bm, Cm

    def forward(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, State]:
        """x (B, T, D), state (tail (B, K-1, E), h (B, E, N)) or None -> (B, T, D), the next state."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        tail, h0 = (None, None) if state is None else state
        # Float32 from here to out_proj, autocast off (minrnn.py's reasons): the state sums hundreds
        # of decayed steps, which bf16 would round by up to 0.4% each; Δ's bias sits near
        # softplus^-1(1e-3) = -6.9, where bf16's step (0.03) is 3% of Δ; and the carried state keeps
        # a resume exact whatever trainer.precision is.
        with torch.autocast(x.device.type, enabled=False):
            u, tail = self.conv(u.float(), tail)
            u = F.silu(u)  # (B, T, E)
            dt, Bm, Cm = self.ssm_params(u)
            A = -torch.exp(self.A_log)  # (E, N) or (H,), < 0: every state decays
            P = self.head_dim
            if P is None:
                scan = sequential_scan if x.shape[1] == 1 else selective_scan  # one token: no chunk set-up
                y, h = scan(dt, u, A, Bm, Cm, h0)
            elif x.shape[1] > 1:
                y, h = ssd_scan(dt, u, A, Bm, Cm, h0)
            else:  # one token: the step loop, each head's Δ and decay repeated over its P channels
                A = A.repeat_interleave(P)[:, None].expand(-1, self.d_state)  # (E, N)
                y, h = sequential_scan(dt.repeat_interleave(P, -1), u, A, Bm, Cm, h0)
            y = (y + u * self.D) * F.silu(z.float())  # (B, T, E)
        return self.out_proj(y), (tail, h)


# ----------------------------------------------------------------------------- one block
class Block(nn.Module):
    """x + Mamba(RMSNorm(x)); bidirectional: plus a second mixer over each row reversed within its length."""

    def __init__(self, d_model: int, dirs: int, dropout: float, **mixer):
        super().__init__()
        self.norm = nn.RMSNorm(d_model)
        self.mixers = nn.ModuleList(Mamba(d_model, **mixer) for _ in range(dirs))  # [forward, backward]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: Optional[State], rev: Optional[torch.Tensor]):
        """x (B, T, D) -> (B, T, D), the forward mixer's state. rev: reverse_index (B, T) or None."""
        h = self.norm(x)
        y, state = self.mixers[0](h, state)
        if rev is not None:
            y = y + flip(self.mixers[1](flip(h, rev), None)[0], rev)
        return x + self.drop(y), state


# ----------------------------------------------------------------------------- the model
class MambaModel(MixerStack):
    """Carried state: (layers, B, K-1, E) convolution tails and (layers, B, E, N) SSM states, float32."""

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
        d_model: int = 256,  # the embedding's and the residual stream's width
        num_layers: int = 2,
        d_state: int = 16,  # N, states per channel (the paper's 16)
        d_conv: int = 4,  # the causal convolution's width (the paper's 4)
        expand: int = 2,  # E / d_model (the paper's 2)
        dt_rank: Optional[int] = None,  # Δ's bottleneck; None: ceil(d_model / 16), the paper's
        selective: bool = True,  # False: Δ, B, C learned constants (time-invariant control)
        head_dim: Optional[int] = None,  # P: one Δ and one decay per head of P channels (Mamba-2), ssd_scan
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        bidirectional: bool = False,  # classification only: a language model must not see the future
        pooling: Pooling = "last",  # classification only
        tie_weights: bool = False,  # language modelling: one matrix maps ids to vectors and back
    ):
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank or math.ceil(d_model / 16),
                     selective=bool(selective), head_dim=head_dim)
        super().__init__(vocab_size=vocab_size, num_outputs=num_outputs, head=head, d_model=d_model,
                         num_layers=num_layers, dropout=dropout, word_dropout=word_dropout,
                         bidirectional=bidirectional, pooling=pooling, tie_weights=tie_weights,
                         block=lambda dirs: Block(d_model, dirs, dropout, **mixer))

    @classmethod
    def describe(cls, m: dict) -> str:
        bi = "Bi-" if m["bidirectional"] else ""
        kind = "Mamba" if m["selective"] else "S4D-like (selective=false)"
        heads = f", one decay per {m['head_dim']} channels" if m.get("head_dim") else ""
        return (f"{bi}{kind} {m['num_layers']} x {m['d_model']}, {m['d_state']} states per channel{heads}, "
                f"{m['pooling']} pooling")

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        check_positive(cfg, "d_model", "num_layers", "d_state", "d_conv", "expand")
        require(cfg.dt_rank is None or cfg.dt_rank > 0, f"model.dt_rank must be positive or null, got {cfg.dt_rank}.")
        E = cfg.expand * cfg.d_model
        require(cfg.head_dim is None or (cfg.head_dim > 0 and E % cfg.head_dim == 0),
                f"model.head_dim must be null or divide the inner width expand x d_model = {E}, got {cfg.head_dim}.")
        check_fraction(cfg, "dropout", "word_dropout")
        require(not (cfg.bidirectional and head == "lm"), "model.bidirectional=true lets a language model see "
                "the next character; use it only with a classification dataset (data=imdb).")
