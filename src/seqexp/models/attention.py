"""Attention encoder: token + positional embedding, N pre-norm blocks, a head.

Each block is x + Attn(LN(x)) then x + MLP(LN(x)), as in GPT-2/nanoGPT. Self-attention uses
torch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels where the
device has them).
- language modelling: causal, so position t sees positions <= t only; logits (B, T, V).
- classification: bidirectional with a key padding mask, so no query attends to padding;
  valid positions are pooled to (B, C).
Positions enter as a learned or sinusoidal table added to the token embeddings, (alibi) as a
penalty on attention scores linear in the distance between query and key, one slope per head, or
(rotary, RoFormer: Su et al. 2021) as a rotation of each query and key by its position, so that
a score depends on the distance only.
The options of the speedruns (modded-nanogpt), each off by default: qk_norm (RMSNorm of every
head's queries and keys, which bounds the scores), mlp=relu2 or swiglu (the feed-forward's
activation), zero_init (attention's and the feed-forward's output projections start at zero,
so every block starts as the identity), logit_softcap (cap x tanh(logits / cap)); tie_weights
false unties the language model's head.
With conv_kernel > 0 each block starts with x + Conv(LN(x)), a depthwise convolution over time
(Conformer's convolution module, Gulati et al. 2020), so attention compares phrases, not single
words.
With window > 0 attention is local (sliding window, as in Longformer or Mistral): a query sees
the keys at most `window` positions away (before it only, when causal). A stack of n_layers
then reads at most n_layers x window positions back (plus the convolutions' reach): beyond that
no input changes a logit, which the memory lab (data/memory.py) makes visible.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqexp.errors import require
from seqexp.models.base import Pooling, SequenceModel, check_fraction, check_positive
from seqexp.models.layers import MaskedPooling, embed_words, length_mask, lengths_or_full, maybe_dropout


def rotary_tables(positions: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) -> (cos, sin), each (T, hs/2): the angles position x 10000^(-2i/hs) of
    RoFormer's rotation, one frequency per pair of channels."""
    freq = torch.exp(torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device)
                     * (-math.log(10000.0) / head_size))  # (hs/2,)
    angle = positions.float()[:, None] * freq[None, :]  # (T, hs/2)
    return angle.cos(), angle.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs): channel pairs (i, i + hs/2) turned by their position's angles. A query at
    i and a key at j then meet at angle i - j: the score depends on the distance only."""
    a, b = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, qk_norm: bool = False):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        # QK-norm: unit-RMS queries and keys (times a learned gain, 1 at first) keep every score
        # within +-sqrt(hs) x gains, so no logit of the softmax can run away early in training
        hs = d_model // n_heads
        self.q_norm, self.k_norm = (nn.RMSNorm(hs), nn.RMSNorm(hs)) if qk_norm else (None, None)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, need_weights: bool = False,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """mask: None, bool (B, 1, 1, T) True = attend, or an additive float (B|1, nh, T, T) (ALiBi),
        built once per forward by AttentionModel.attention_mask; rope: rotary (cos, sin), (T, hs/2)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # after the norm: a rotation keeps the norm
            q, k = rotate(q, *rope), rotate(k, *rope)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # under autocast: SDPA wants the query's dtype
        if need_weights:  # explicit path, only for inspecting attention maps
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            if causal:
                att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            if mask is not None:
                att = att + mask if mask.is_floating_point() else att.masked_fill(~mask, float("-inf"))
            weights = att.softmax(-1)
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), weights


class LocalConv(nn.Module):
    """Residual depthwise convolution: each channel mixes `kernel` neighbouring positions (a learned
    n-gram feature that attention would otherwise have to assemble from positions), then a
    pointwise projection mixes channels. Causal models pad on the left only, so position t reads
    t-k+1..t. Padding is zeroed before every convolution: a valid position next to it reads zeros,
    exactly as at the end of a sequence batched alone."""

    def __init__(self, d_model: int, kernel: int, dropout: float, causal: bool):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.dw = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.pw = nn.Linear(d_model, d_model)
        self.drop = maybe_dropout(dropout)
        self.left = kernel - 1 if causal else (kernel - 1) // 2
        self.right = kernel - 1 - self.left

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, C), keep (B, T) bool, True at real tokens, or None -> (B, T, C)."""
        h = self.ln(x)
        if keep is not None:
            h = h.masked_fill(~keep[:, :, None], 0.0)
        h = F.pad(h.transpose(1, 2), (self.left, self.right))  # (B, C, left + T + right)
        h = F.gelu(self.dw(h)).transpose(1, 2)  # (B, T, C)
        return x + self.drop(self.pw(h))


class ReLU2(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021; the speedruns' feed-forward activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), then down (Shazeer 2020). Three matrices instead of two: the
    hidden width is 2/3 of mlp_ratio x d_model, so the parameter count matches the GELU MLP's
    (3 x d x 2rd/3 = 2 x d x rd)."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 2 * hidden)  # gate and up, one matmul
        self.proj = nn.Linear(hidden, d_model)
        self.drop = maybe_dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.drop(self.proj(F.silu(gate) * up))


def feed_forward(kind: str, d_model: int, mlp_ratio: int, dropout: float) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(d_model, 2 * mlp_ratio * d_model // 3, dropout)
    # gelu and relu2: the same two matrices (and state-dict keys mlp.0, mlp.2 as always)
    return nn.Sequential(
        nn.Linear(d_model, mlp_ratio * d_model), ReLU2() if kind == "relu2" else nn.GELU(),
        nn.Linear(mlp_ratio * d_model, d_model), maybe_dropout(dropout),
    )


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float,
                 conv_kernel: int = 0,  # > 0: a depthwise convolution of this width opens each block (Conformer)
                 causal: bool = False, qk_norm: bool = False, mlp: str = "gelu"):
        super().__init__()
        self.conv = LocalConv(d_model, conv_kernel, dropout, causal) if conv_kernel else None
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, qk_norm)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = feed_forward(mlp, d_model, mlp_ratio, dropout)
        self.drop = maybe_dropout(dropout)

    def forward(self, x, mask, causal, need_weights=False, keep=None, rope=None):
        if self.conv is not None:
            x = self.conv(x, keep)
        a, weights = self.attn(self.ln1(x), mask, causal, need_weights, rope)
        x = x + self.drop(a)
        x = x + self.mlp(self.ln2(x))
        return x, weights


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim) fixed encoding of Vaswani et al. (2017)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """(nh,) the geometric slopes of ALiBi (Press et al., 2022): 2^(-8/nh), 2^(-16/nh), ... so one
    head looks at the next few tokens and another across the whole review."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


def alibi_bias(slopes: torch.Tensor, T: int) -> torch.Tensor:
    """(nh, T, T): -slope * |i - j|, the score penalty for query i attending to key j. Symmetric:
    a causal model masks j > i anyway, and an encoder should see both sides alike."""
    pos = torch.arange(T, device=slopes.device)
    return -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()


class AttentionModel(SequenceModel):
    # Windows are independent: no state is carried between batches.
    stateful = False

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
        max_len: int,  # context size: the data's window (lm) or truncation length (classify)
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,  # nanoGPT's CPU recipe: none for short runs on small data
        word_dropout: float = 0.0,
        # alibi: scores fall off with distance; rotary: queries and keys turned by their positions
        positional: Literal["learned", "sinusoidal", "alibi", "rotary"] = "learned",
        pooling: Pooling = "mean",  # classification only
        conv_kernel: int = 0,
        tie_weights: bool = True,  # language modelling: one matrix maps ids to vectors and back
        window: int = 0,  # > 0: each query sees keys at most this many positions away (local attention)
        qk_norm: bool = False,  # RMSNorm of each head's queries and keys before their dot product
        mlp: Literal["gelu", "relu2", "swiglu"] = "gelu",  # the feed-forward's activation (swiglu: gated)
        zero_init: bool = False,  # attention's and the feed-forward's output projections start at zero
        logit_softcap: Optional[float] = None,  # > 0: logits = cap x tanh(logits / cap); 0 or null: off
    ):
        super().__init__()
        assert head in ("lm", "classify"), head
        self.lm, self.context_size = head == "lm", max_len
        self.word_dropout = float(word_dropout)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.alibi, self.rotary = str(positional) == "alibi", str(positional) == "rotary"
        self.window = int(window)
        self.softcap = float(logit_softcap or 0.0)
        if self.alibi:  # positions act inside attention, as a bias on the scores
            self.pos_emb = None
            self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)
        elif self.rotary:  # positions act inside attention, on queries and keys (tables per forward)
            self.pos_emb = None
        elif str(positional) == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model))
        else:
            # at the token embeddings' scale (init std 0.02): unscaled, the +-1 table drowns the
            # tokens and a classifier starts out seeing positions only
            self.register_buffer("pos_emb", 0.02 * sinusoidal_table(max_len, d_model), persistent=False)
        self.drop = maybe_dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout, conv_kernel, head == "lm",
                                          qk_norm, str(mlp)) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.pool = MaskedPooling(pooling, d_model) if head == "classify" else None
        self.head = nn.Linear(d_model, num_outputs, bias=head == "classify")
        self._init_weights(n_layers, zero_init)
        if head == "lm" and tie_weights:  # the same matrix maps ids to vectors and back
            self.head.weight = self.tok_emb.weight

    @classmethod
    def describe(cls, m: dict) -> str:
        conv = f", convolution {m['conv_kernel']} wide" if m.get("conv_kernel") else ""
        extra = [str(m["positional"])] if str(m.get("positional", "learned")) != "learned" else []
        extra += ["QK-norm"] * bool(m.get("qk_norm")) + [str(m["mlp"])] * (str(m.get("mlp", "gelu")) != "gelu")
        extra += ["zero-init"] * bool(m.get("zero_init")) + [f"softcap {m['logit_softcap']}"] * bool(m.get("logit_softcap"))
        extra = "".join(f", {e}" for e in extra)
        return f"attention {m['n_layers']} x {m['d_model']}, {m['n_heads']} heads{conv}{extra}, {m['pooling']} pooling"

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        check_positive(cfg, "d_model", "n_heads", "n_layers", "mlp_ratio")
        check_fraction(cfg, "dropout", "word_dropout")
        require(cfg.d_model % cfg.n_heads == 0,
                f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}.")
        require(cfg.conv_kernel >= 0, f"model.conv_kernel must be 0 (none) or a width >= 1, got {cfg.conv_kernel}.")
        require(cfg.window >= 0, f"model.window must be 0 (global attention) or a distance >= 1, got {cfg.window}.")
        require(str(cfg.positional) != "rotary" or (cfg.d_model // cfg.n_heads) % 2 == 0,
                f"model.positional=rotary turns pairs of channels: the head size model.d_model / model.n_heads "
                f"= {cfg.d_model // cfg.n_heads} must be even.")
        require((cfg.logit_softcap or 0) >= 0,
                f"model.logit_softcap must be > 0 (the cap) or 0/null (off), got {cfg.logit_softcap}.")

    def _init_weights(self, n_layers: int, zero_init: bool = False) -> None:
        # GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * layers). The depthwise
        # convolution keeps torch's init (~1/sqrt(kernel)): at 0.02 it and the small projection
        # after it would each hold back the other's gradient. zero_init: attention's and the
        # feed-forward's output projections at 0 (modded-nanogpt), every block the identity at
        # first; the first step's gradient reaches them alone, the rest of the block from the next.
        for name, p in self.named_parameters():
            if p.dim() >= 2 and not name.endswith("dw.weight"):
                residual = name.endswith(("proj.weight", "mlp.2.weight", "pw.weight"))
                std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
                nn.init.normal_(p, 0.0, std)  # drawn in every case: the other weights' init stays as it is
                if zero_init and residual and not name.endswith("pw.weight"):
                    nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def input_embedding(self) -> nn.Module:
        return self.tok_emb  # (B, T, C): the token vectors; positions are added after

    def state_size(self, seq_len: int) -> int:
        """The key-value cache: a key and a value of d_model numbers per layer for every earlier
        position a query can see (all seq_len of them, or the last `window`), plus the kernel - 1
        inputs each layer's convolution reads back (model.conv_kernel)."""
        d, n = self.tok_emb.embedding_dim, len(self.blocks)
        seen = min(seq_len, self.window) if self.window else seq_len
        conv = self.blocks[0].conv
        tail = min(conv.dw.kernel_size[0] - 1, seq_len) if conv is not None else 0
        return n * d * (2 * seen + tail)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state=None,
                need_weights: bool = False):
        """tokens (B, T) -> (logits, None), or (logits, per-layer attention maps) with need_weights."""
        B, T = tokens.shape
        assert T <= self.context_size, f"sequence of {T} exceeds the context size {self.context_size}"
        x = embed_words(self.tok_emb, tokens, self.word_dropout)  # (B, T, C)
        x = self.drop(x if self.pos_emb is None else x + self.pos_emb[:T])
        # rotary: positions 0..T-1 of this window, as the learned table counts them; cheap, so not cached
        rope = rotary_tables(torch.arange(T, device=tokens.device), self.tok_emb.embedding_dim
                             // self.blocks[0].attn.n_heads) if self.rotary else None
        causal = self.lm
        # (B, T) True at real tokens, or None when all are: padding for attention and convolutions
        keep = None if causal or lengths is None else length_mask(lengths.to(tokens.device), T)
        # built once for every block; with ALiBi or a window the mask itself is causal (mask_causal False)
        mask, mask_causal = self.attention_mask(T, keep, causal, tokens.device)
        maps = []
        for block in self.blocks:
            x, w = block(x, mask, mask_causal, need_weights, keep, rope)
            maps.append(w)
        x = self.ln_f(x)
        if causal:
            logits = self.head(x)  # (B, T, V)
        else:
            logits = self.head(self.pool(x, lengths_or_full(tokens, lengths)))  # (B, C)
        if self.softcap:  # (Gemma 2) smooth, |logits| < cap: no logit can grow without bound
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits, (maps if need_weights else None)

    def attention_mask(self, T: int, keep: Optional[torch.Tensor], causal: bool, device: torch.device):
        """keep (B, T) bool, True at real tokens, or None -> (mask, whether attention must still be
        made causal) for every block: the key padding mask (B, 1, 1, T), True = attend, or None;
        with a window the bool mask (B|1, 1, T, T) of the keys each query may see; with ALiBi one
        additive float mask (B|1, nh, T, T), the distance bias and -inf where a key may not be seen.
        Those two carry causality themselves."""
        mask = None if keep is None else keep[:, None, None, :]
        if not self.alibi and not self.window:
            return mask, causal
        allowed = torch.ones(T, T, dtype=torch.bool, device=device)
        allowed = allowed.tril() if causal else allowed
        if self.window:
            pos = torch.arange(T, device=device)
            allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= self.window)
        if mask is not None:  # (B, 1, T, T)
            allowed = allowed & mask
            # a padded query far from every real token would have no key left (a NaN row, and
            # 0 x NaN is NaN where it is read as a value); only such a row sees itself. Nothing
            # real reads it.
            empty = ~allowed.any(-1, keepdim=True)  # (B, 1, T, 1)
            allowed = allowed | (empty & torch.eye(T, dtype=torch.bool, device=device))
        if not self.alibi:
            return allowed, False
        return alibi_bias(self.slopes, T).masked_fill(~allowed, float("-inf")), False
