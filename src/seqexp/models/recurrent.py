"""Vanilla RNN, LSTM and GRU on torch's fused modules (cuDNN on CUDA).

One class serves both tasks:
- language modelling ("lm"): logits for every position, (B, T, V). The hidden state is
  returned so the trainer can carry it across consecutive chunks (stateful truncated BPTT).
- classification ("classify"): padded batches are packed, so padding never enters the
  recurrence; the valid states are pooled to one vector per sequence, (B, C).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqexp.models.heads import MaskedPooling

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
State = Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


class RecurrentModel(nn.Module):
    # The trainer carries state across chunks for models that say so.
    stateful = True

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        task: str,
        pad_id: int = 0,
        max_len: Optional[int] = None,  # unused: recurrence has no context limit
        cell: str = "lstm",
        embed_dim: int = 64,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        bidirectional: bool = False,
        pooling: str = "last",
        tie_weights: bool = False,
    ):
        super().__init__()
        assert task in ("lm", "classify"), task
        self.task, self.cell, self.pooling = task, str(cell), str(pooling)
        self.bidirectional = bool(bidirectional) and task == "classify"
        self.context_size = None
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.rnn = CELLS[self.cell](
            embed_dim, hidden_size, num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,  # torch applies it between layers only
            bidirectional=self.bidirectional,
        )
        out_dim = hidden_size * (2 if self.bidirectional else 1)
        if task == "lm":
            self.head = nn.Linear(out_dim, num_outputs)
            if tie_weights:  # config.validate ensures embed_dim == hidden_size
                self.head.weight = self.embed.weight
        else:
            self.pool = MaskedPooling(self.pooling, out_dim) if self.pooling != "last" else None
            self.head = nn.Linear(out_dim, num_outputs)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state: State = None):
        """tokens (B, T) -> (logits, state). logits: (B, T, V) for lm, (B, C) for classify."""
        x = self.drop(self.embed(tokens))  # (B, T, E)
        if self.task == "lm":
            out, state = self.rnn(x, state)  # (B, T, H)
            return self.head(self.drop(out)), state

        # classification: pack so that the recurrence stops at each sequence's true end
        B, T = tokens.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.rnn(packed)
        if self.cell == "lstm":
            h_n = h_n[0]  # (layers * dirs, B, H): hidden, not cell state
        if self.pooling == "last":
            # final state of the top layer; backward direction's "last" is position 0
            top = h_n[-2:] if self.bidirectional else h_n[-1:]
            pooled = torch.cat(list(top), dim=-1)  # (B, H * dirs)
        else:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, H * dirs)
            pooled = self.pool(out, lengths)
        return self.head(self.drop(pooled)), None
