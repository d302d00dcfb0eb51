"""A throwaway model family: embeddings, one causal convolution, a head.

Language modelling: position t reads tokens t-k+1..t (left padding only), so it is causal.
Classification: the valid positions' features are averaged, so padding never reaches a logit.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqexp.errors import require
from seqexp.models.base import SequenceModel


class ConvModel(SequenceModel):
    def __init__(self, *, vocab_size: int, num_outputs: int, head: str, width: int = 3, dim: int = 16):
        super().__init__()
        self.lm, self.width = head == "lm", width
        self.embed = nn.Embedding(vocab_size, dim)
        self.conv = nn.Conv1d(dim, dim, width)
        self.head = nn.Linear(dim, num_outputs)

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        require(cfg.width >= 1, f"model.width must be >= 1, got {cfg.width}.")

    def input_embedding(self) -> nn.Module:
        return self.embed  # (B, T, E)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state=None):
        x = self.embed(tokens).transpose(1, 2)  # (B, E, T)
        h = torch.relu(self.conv(F.pad(x, (self.width - 1, 0)))).transpose(1, 2)  # (B, T, E)
        if self.lm:
            return self.head(h), None  # (B, T, V)
        T = tokens.shape[1]
        lengths = torch.full_like(tokens[:, 0], T) if lengths is None else lengths.to(tokens.device)
        keep = (torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]).float()  # (B, T)
        pooled = (h * keep[..., None]).sum(1) / lengths[:, None].clamp(min=1)  # (B, E)
        return self.head(pooled), None  # (B, C)
