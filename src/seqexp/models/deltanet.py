"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"): a linear-attention memory that overwrites what it stored under a key instead of only
adding to it, and forgets as a whole through a gate.

Per head, a state S (d_v, d_k) maps keys to values. At each step

    S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ,    o_t = S_t q_t

i.e. S_{t-1} decayed by α_t, then the value it returns for k_t moved a fraction β_t of the way to
v_t (the delta rule: one gradient step on ||S k_t - v_t||²). q and k are L2-normalised (so the
step is stable for β in (0, 1)), q scaled by d_k^-1/2; q, k, v come from a short causal
convolution with SiLU; β = sigmoid(b_proj x); α = exp(-exp(A_log) softplus(a_proj x + dt_bias)),
Mamba-2's decay in log space (A in [1, 16], Δ in [1e-3, 1e-1] at init). The output is
RMSNorm(o) * SiLU(g_proj x) per head, then out_proj. `gate=False` is plain DeltaNet (Yang et al.,
2024): α ≡ 1, with no a_proj, A_log nor dt_bias (the output gate stays).

Training uses the chunked form (`chunked_delta_rule`; the WY/UT representation of the paper and
of flash-linear-attention): within a chunk of Q steps, with γ_t = α_1...α_t and the state S_0
entering it (written here as Sᵀ, (d_k, d_v), so that products are row-major),

    U = (I + A)^-1 (β V - β γ K S_0),  A_ts = β_t (γ_t / γ_s) k_t·k_s for s < t (else 0)
    O = γ Q S_0 + ((Q Kᵀ) ⊙ γ_t/γ_s, s <= t) U
    S_Q = γ_Q S_0 + (K ⊙ γ_Q/γ)ᵀ U

(u_t = β_t (v_t - α_t S_{t-1} k_t), the value actually written). (I + A)^-1 is one unit-triangular
solve for all chunks at once; a loop over the T/Q chunks carries the state; everything is matmuls
(no hand-written backward: autograd). Decays enter only as exp of a sum of log α over a segment
s < r <= t (`segment_sum`), <= 0: nothing overflows, and an underflow to 0 is what the recurrence
computes. The step loop (`sequential_delta_rule`) serves one token at a time (sampling).

Chunk size (CHUNK): forward + backward of the recurrence alone, 1 thread, 4 heads of 64
(`OMP_NUM_THREADS=1 python benchmarks/ssm_scans.py --only deltanet`, paired rounds on a loaded
2-core machine): at B x T = 8 x 512 and 32 x 128, chunks of 16 and 32 were level (5.7 and 5.1-5.4
us per token and head), 64 ~15% slower (its (Q, Q) products and solve grow as Q^2), and the step
loop 5-10x slower (54 and 26 us: T tiny matmuls).

Blocks: pre-norm residual (RMSNorm), the mixer then a feed-forward, as Gated DeltaNet's. Carried
state per layer: the convolution tail and S, float32. Classification as models/mamba.py.
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

CHUNK = 32  # steps per chunk of the parallel form (module docstring)
DT_MIN, DT_MAX = 1e-3, 1e-1  # Δ's range at init (Mamba-2, Gated DeltaNet)

State = tuple[torch.Tensor, torch.Tensor]  # (convolution tail (.., B, K-1, C), S (.., B, H, d_k, d_v))


# ----------------------------------------------------------------------------- the recurrence
def sequential_delta_rule(q, k, v, log_alpha, beta, S0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time. q, k (B, H, T, K); v (B, H, T, V); log_alpha, beta
    (B, H, T); S0 (B, H, K, V) or None (zeros) -> o (B, H, T, V), S_T (B, H, K, V)."""
    B, H, T, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if S0 is None else S0
    outs = []
    for t in range(T):
        S = torch.exp(log_alpha[:, :, t, None, None]) * S
        u = beta[:, :, t, None] * (v[:, :, t] - (k[:, :, t, None, :] @ S).squeeze(2))  # (B, H, V)
        S = S + k[:, :, t, :, None] * u[:, :, None, :]  # (B, H, K, V)
        outs.append((q[:, :, t, None, :] @ S).squeeze(2))
    return torch.stack(outs, dim=2), S


def chunked_delta_rule(q, k, v, log_alpha, beta, S0: Optional[torch.Tensor],
                       chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """What `sequential_delta_rule` computes, in chunks of `chunk` steps (module docstring)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    Q = min(chunk, T)
    N = -(-T // Q)
    pad = N * Q - T
    if pad:  # steps with k = v = q = 0, β = 0, α = 1 leave the state as it is; their outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_alpha, beta = F.pad(log_alpha, (0, pad)), F.pad(beta, (0, pad))
    q, k, v = (x.reshape(B, H, N, Q, -1) for x in (q, k, v))  # (B, H, N, Q, K | V): N chunks of Q steps
    beta = beta.reshape(B, H, N, Q, 1)
    log_alpha = log_alpha.reshape(B, H, N, Q)
    g = log_alpha.cumsum(-1)  # log γ_t within each chunk
    decay = segment_sum(log_alpha).exp()  # (B, H, N, Q, Q): γ_t / γ_s for s <= t, 0 above
    A = (beta * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly lower
    eye = torch.eye(Q, dtype=q.dtype, device=q.device)
    WU = torch.linalg.solve_triangular(eye + A, torch.cat([beta * v, beta * g.exp()[..., None] * k], -1),
                                       upper=False, unitriangular=True)  # (B, H, N, Q, V + K)
    U0, W = WU.split([V, K], dim=-1)  # U = U0 - W S_0
    attn = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, Q, Q), s <= t
    k_end = k * decay[..., -1, :, None]  # (B, H, N, Q, K): k_s γ_Q / γ_s
    S = q.new_zeros(B, H, K, V) if S0 is None else S0
    outs = []
    # unbind, not [:, :, n]: each indexing's backward would write a zero gradient the size of the whole tensor
    for U0_n, W_n, q_n, attn_n, k_n, g_n in zip(*(x.unbind(2) for x in (U0, W, q, attn, k_end, g.exp()))):
        U = U0_n - W_n @ S  # (B, H, Q, V): the values written
        outs.append(g_n[..., None] * (q_n @ S) + attn_n @ U)
        S = g_n[..., -1, None, None] * S + k_n.transpose(-1, -2) @ U
    return torch.stack(outs, dim=2).reshape(B, H, N * Q, V)[:, :, :T], S


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim (F.normalize, eps 1e-12): as a product with rsqrt, 2-3x faster
    forward + backward than F.normalize's vector norm on a CPU over short (16-64) head vectors."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-24))


# ----------------------------------------------------------------------------- one mixer
class GatedDeltaNet(nn.Module):
    """One (Gated) DeltaNet mixer: x (B, T, D) -> (B, T, D), with its state (module docstring)."""

    def __init__(self, d_model: int, num_heads: int, d_conv: int, gate: bool):
        super().__init__()
        self.H, self.dk = num_heads, d_model // num_heads  # d_v = d_k: values as wide as keys
        self.gate = gate
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model, d_conv, bias=False)  # depthwise: q's, k's and v's own convolutions
        self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        if gate:
            self.a_proj = nn.Linear(d_model, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
            dt = torch.exp(torch.empty(num_heads).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        # per head, one weight shared by the heads; eps as Gated DeltaNet's: float32's default (1e-7)
        # would scale the gradient of a near-zero o by up to 1/sqrt(eps) ~ 3000
        self.o_norm = nn.RMSNorm(self.dk, eps=1e-5)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.state_numbers = self.conv.state_size() + num_heads * self.dk * self.dk  # tails and S (H, d_k, d_v)

    def coefficients(self, x: torch.Tensor, tail: Optional[torch.Tensor]):
        """x (B, T, D), the convolution's tail -> q, k, v (B, H, T, d_k), log α and β (B, H, T), float32,
        and the next tail. Without the gate log α is 0 (α ≡ 1)."""
        B, T, D = x.shape
        qkv, b = self.qkv(x), self.b_proj(x)  # (B, T, 3D), (B, T, H)
        a = self.a_proj(x) if self.gate else None
        # Float32 from here to out_proj, autocast off (minrnn.py's reasons): S sums hundreds of
        # decayed rank-one updates, and the carried state keeps a resume exact.
        with torch.autocast(x.device.type, enabled=False):
            qkv, tail = self.conv(qkv.float(), tail)
            q, k, v = F.silu(qkv).view(B, T, 3, self.H, self.dk).permute(2, 0, 3, 1, 4)  # (B, H, T, d_k) each
            q = unit(q) / math.sqrt(self.dk)
            k = unit(k)
            beta = torch.sigmoid(b.float()).transpose(1, 2)  # (B, H, T)
            if not self.gate:
                return q, k, v, torch.zeros_like(beta), beta, tail
            log_alpha = -torch.exp(self.A_log) * F.softplus(a.float() + self.dt_bias)  # (B, T, H), <= 0
        return q, k, v, log_alpha.transpose(1, 2), beta, tail

    def forward(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, State]:
        """x (B, T, D), state (tail (B, K-1, 3D), S (B, H, d_k, d_v)) or None -> (B, T, D), the next state."""
        B, T, D = x.shape
        tail, S0 = (None, None) if state is None else state
        q, k, v, log_alpha, beta, tail = self.coefficients(x, tail)
        g = self.g_proj(x)  # (B, T, D)
        with torch.autocast(x.device.type, enabled=False):
            rule = sequential_delta_rule if T == 1 else chunked_delta_rule  # one token: no chunk set-up
            o, S = rule(q, k, v, log_alpha, beta, S0)  # (B, H, T, d_v)
            o = self.o_norm(o).transpose(1, 2).reshape(B, T, D) * F.silu(g.float())
        return self.out_proj(o), (tail, S)


# ----------------------------------------------------------------------------- one block
class Block(nn.Module):
    """x + DeltaNet(RMSNorm(x)), then x + MLP(RMSNorm(x)); bidirectional: plus a second mixer over
    each row reversed within its length."""

    def __init__(self, d_model: int, dirs: int, mlp_ratio: int, dropout: float, **mixer):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixers = nn.ModuleList(GatedDeltaNet(d_model, **mixer) for _ in range(dirs))  # [forward, backward]
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: Optional[State], rev: Optional[torch.Tensor]):
        """x (B, T, D) -> (B, T, D), the forward mixer's state. rev: reverse_index (B, T) or None."""
        h = self.norm1(x)
        y, state = self.mixers[0](h, state)
        if rev is not None:
            y = y + flip(self.mixers[1](flip(h, rev), None)[0], rev)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state


# ----------------------------------------------------------------------------- the model
class DeltaNetModel(MixerStack):
    """Carried state: (layers, B, K-1, 3D) convolution tails and (layers, B, H, d_k, d_v) states, float32."""

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
        d_model: int = 256,  # the embedding's and the residual stream's width
        num_layers: int = 2,
        num_heads: int = 4,  # each a d_model / num_heads square state
        d_conv: int = 4,  # the causal convolution's width (the paper's 4)
        gate: bool = True,  # False: plain DeltaNet, α ≡ 1
        mlp_ratio: int = 4,  # feed-forward width / d_model
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        bidirectional: bool = False,  # classification only: a language model must not see the future
        pooling: Pooling = "last",  # classification only
        tie_weights: bool = False,  # language modelling: one matrix maps ids to vectors and back
    ):
        super().__init__(vocab_size=vocab_size, num_outputs=num_outputs, head=head, d_model=d_model,
                         num_layers=num_layers, dropout=dropout, word_dropout=word_dropout,
                         bidirectional=bidirectional, pooling=pooling, tie_weights=tie_weights,
                         block=lambda dirs: Block(d_model, dirs, mlp_ratio, dropout, num_heads=num_heads,
                                                  d_conv=d_conv, gate=bool(gate)))

    @classmethod
    def describe(cls, m: dict) -> str:
        bi = "Bi-" if m["bidirectional"] else ""
        kind = "Gated DeltaNet" if m["gate"] else "DeltaNet (gate=false)"
        return f"{bi}{kind} {m['num_layers']} x {m['d_model']}, {m['num_heads']} heads, {m['pooling']} pooling"

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        check_positive(cfg, "d_model", "num_layers", "num_heads", "d_conv", "mlp_ratio")
        require(cfg.d_model % cfg.num_heads == 0,
                f"model.d_model ({cfg.d_model}) must be a multiple of model.num_heads ({cfg.num_heads}).")
        check_fraction(cfg, "dropout", "word_dropout")
        require(not (cfg.bidirectional and head == "lm"), "model.bidirectional=true lets a language model see "
                "the next character; use it only with a classification dataset (data=imdb).")
