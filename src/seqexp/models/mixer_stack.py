"""What Mamba (mamba.py) and Gated DeltaNet (deltanet.py) share around their mixers: an embedding,
a stack of pre-norm residual blocks, a final RMSNorm and a head.

Each family builds its own blocks (`block(dirs)`: a module mapping x (B, T, D), a carried state
and `rev` to (B, T, D) and its forward mixer's new state, with `mixers` whose `state_numbers`
count what they carry). A language model runs every block causally and returns every layer's
state stacked; a classifier runs a second, reversed mixer per block when bidirectional, pools the
valid positions (layers.MaskedPooling) and carries nothing. The family's constructor keeps its
own explicit signature (its config schema) and passes the shared part here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from seqexp.models.base import SequenceModel
from seqexp.models.layers import MaskedPooling, embed_words, lengths_or_full
from seqexp.models.recurrent import reverse_index

State = tuple[torch.Tensor, torch.Tensor]  # (convolution tails (L, B, K-1, C), recurrent states (L, B, ...))


class MixerStack(SequenceModel):
    stateful = True  # the trainer carries the state across chunks (truncated BPTT)
    state_batch_dim = 1  # both parts of the state: (layers, B, ...)

    def __init__(self, *, vocab_size: int, num_outputs: int, head: str, d_model: int, num_layers: int,
                 dropout: float, word_dropout: float, bidirectional: bool, pooling: str, tie_weights: bool,
                 block: Callable[[int], nn.Module]):
        super().__init__()
        assert head in ("lm", "classify"), head
        self.lm, self.pooling = head == "lm", str(pooling)
        self.word_dropout = float(word_dropout)
        self.bidirectional = bool(bidirectional) and head == "classify"
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(block(2 if self.bidirectional else 1) for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model)
        if head == "lm":
            self.head = nn.Linear(d_model, num_outputs)
            if tie_weights:
                self.head.weight = self.embed.weight
            return
        self.pool = MaskedPooling(self.pooling, d_model)
        # last + bidirectional: the final position (the forward mixer has read everything) and
        # position 0 (so has the backward one)
        self.head = nn.Linear(d_model * (2 if self.bidirectional and self.pooling == "last" else 1), num_outputs)

    def state_size(self, seq_len: int) -> int:
        """Every mixer's convolution tail(s) and recurrent state, whatever the length."""
        return sum(m.state_numbers for layer in self.layers for m in layer.mixers)

    def input_embedding(self) -> nn.Module:
        return self.embed  # (B, T, D)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state: Optional[State] = None):
        """tokens (B, T) -> (logits, state). lm: (B, T, V) and every layer's state, stacked (float32);
        classify: (B, C) and None."""
        B, T = tokens.shape
        x = self.drop(embed_words(self.embed, tokens, self.word_dropout))  # (B, T, D)
        if self.lm:
            tails, states = [], []
            for i, layer in enumerate(self.layers):
                x, (tail, s) = layer(x, None if state is None else (state[0][i], state[1][i]), None)
                tails.append(tail)
                states.append(s)
            return self.head(self.norm(x)), (torch.stack(tails), torch.stack(states))

        lengths = lengths_or_full(tokens, lengths)
        rev = reverse_index(lengths, T) if self.bidirectional else None
        for layer in self.layers:
            x, _ = layer(x, None, rev)
        x = self.norm(x)  # (B, T, D); garbage at padded positions only
        pooled = self.pool(x, lengths)  # (B, D)
        if self.bidirectional and self.pooling == "last":
            pooled = torch.cat([pooled, x[:, 0]], dim=-1)  # (B, 2D)
        return self.head(pooled), None
