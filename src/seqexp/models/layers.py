"""What every model family shares: length masks, pooling over valid positions only, word dropout.

Padding must never reach a result, so every reduction here takes the mask into account:
mean divides by the true length, max ignores padded positions, attention pooling gives them
zero weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at valid positions."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def lengths_or_full(tokens: torch.Tensor, lengths) -> torch.Tensor:
    """(B,) lengths on the tokens' device; every row full (T) when none are given."""
    B, T = tokens.shape
    return torch.full((B,), T, device=tokens.device) if lengths is None else lengths.to(tokens.device)


def maybe_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity at p == 0: the same function (dropout at 0 draws no random
    numbers, so the RNG stream is unchanged), without the F.dropout call and its dispatch at every
    use in every step. Neither holds parameters or buffers: state_dict keys are the same either way."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def embed_words(embed: nn.Embedding, tokens: torch.Tensor, p: float) -> torch.Tensor:
    """(B, T) ids -> (B, T, E), with word-type dropout while training (Gal & Ghahramani, 2016).

    Each step a fraction p of the vocabulary is dropped: those words' vectors are zero wherever
    they occur in the batch, the rest are scaled by 1/(1-p). Unlike dropout on single positions,
    a review cannot fall back on another mention of the same actor's name: a classifier has to
    learn from the words that carry sentiment, not memorise words specific to a movie."""
    x = embed(tokens)
    if not embed.training or p == 0.0:
        return x
    keep = torch.empty(embed.num_embeddings, 1, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * (keep / (1.0 - p))[tokens]  # (B, T, E) * (B, T, 1)


class MaskedPooling(nn.Module):
    """(B, T, H) states + (B,) lengths -> (B, H)."""

    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.mode = str(mode)
        # one learned score per position; softmax over valid positions (attention pooling)
        self.score = nn.Linear(dim, 1) if self.mode == "attention" else None

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, H = h.shape
        lengths = lengths.to(h.device)
        mask = length_mask(lengths, T)  # (B, T)
        if self.mode == "last":
            idx = (lengths - 1).clamp(min=0)
            return h[torch.arange(B, device=h.device), idx]  # (B, H)
        if self.mode == "mean":
            h = h.masked_fill(~mask[..., None], 0.0)
            return h.sum(1) / lengths[:, None].to(h.dtype)
        if self.mode == "max":
            return h.masked_fill(~mask[..., None], float("-inf")).amax(1)
        if self.mode == "attention":
            scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
            weights = torch.softmax(scores.float(), dim=1).to(h.dtype)
            return torch.einsum("bt,bth->bh", weights, h)
        raise ValueError(f"unknown pooling '{self.mode}'")
