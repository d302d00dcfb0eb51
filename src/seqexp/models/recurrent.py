"""Vanilla RNN, LSTM and GRU on torch's fused modules (cuDNN on CUDA).

One class serves both tasks:
- language modelling ("lm"): logits for every position, (B, T, V). The hidden state is
  returned so the trainer can carry it across consecutive chunks (stateful truncated BPTT).
- classification ("classify"): padding never enters a state that is used. Each direction of
  each layer is its own one-directional module:
  - forward: a recurrence is causal, so the states at a sequence's valid positions never see
    the padding after them;
  - backward: each sequence is reversed within its own length (padding stays at the end), run
    forward, and its outputs are put back in place -- exactly what a packed bidirectional
    layer computes.
  On CUDA the padded batch is also packed, so cuDNN skips the padding. On CPU it is not:
  torch's CPU recurrence slices the packed input once per time step and each slice's backward
  writes a zero gradient the size of the whole batch, so packed training costs O(T^2). At IMDB
  lengths that made a BiLSTM step ~10x slower (BENCHMARKS.md, fast paths).
  The valid states are pooled to one vector per sequence, (B, C).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqexp.errors import require
from seqexp.models.base import Pooling, SequenceModel, check_fraction, check_positive
from seqexp.models.layers import MaskedPooling, embed_words, lengths_or_full

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
State = Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) gather index that reverses each row within its length; padding stays in place.
    It is its own inverse."""
    t = torch.arange(T, device=lengths.device)[None, :]  # (1, T)
    L = lengths[:, None]
    return torch.where(t < L, L - 1 - t, t)


def flip(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, T, H), row b reversed within its length."""
    return x.gather(1, index[..., None].expand_as(x))


class RecurrentModel(SequenceModel):
    # The trainer carries state across chunks for models that say so.
    stateful = True
    state_batch_dim = 1  # torch's states, h or (h, c), are (layers, B, H) even with batch_first=True

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
        cell: Literal["rnn", "lstm", "gru"] = "lstm",  # rnn: Elman, tanh
        embed_dim: int = 64,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,  # char-rnn uses 0.5 on larger nets; small nets on a few MB rarely over-fit
        word_dropout: float = 0.0,
        bidirectional: bool = False,  # classification only: a language model must not see the future
        pooling: Pooling = "last",  # classification only
        tie_weights: bool = False,  # language modelling; needs embed_dim == hidden_size
    ):
        super().__init__()
        assert head in ("lm", "classify"), head
        self.lm, self.cell, self.pooling = head == "lm", str(cell), str(pooling)
        self.num_layers = int(num_layers)
        self.word_dropout = float(word_dropout)
        self.bidirectional = bool(bidirectional) and head == "classify"
        self.pack: Optional[bool] = None  # classification: None packs on CUDA only (see above)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        if head == "lm":
            self.rnn = CELLS[self.cell](
                embed_dim, hidden_size, num_layers, batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,  # torch applies it between layers only
            )
            self.head = nn.Linear(hidden_size, num_outputs)
            if tie_weights:  # config.validate ensures embed_dim == hidden_size
                self.head.weight = self.embed.weight
            return
        dirs = 2 if self.bidirectional else 1
        # layers[i][d]: layer i, direction d (0 forward, 1 backward)
        self.layers = nn.ModuleList(
            nn.ModuleList(CELLS[self.cell](embed_dim if i == 0 else hidden_size * dirs, hidden_size, batch_first=True)
                          for _ in range(dirs))
            for i in range(num_layers)
        )
        if self.cell == "lstm":
            # forget-gate bias 1 (Jozefowicz et al., 2015): the state starts out remembering, so
            # gradients reach the start of a long review. torch orders the gates i, f, g, o and
            # adds b_ih and b_hh: the forget slice of b_ih gets 1, that of b_hh 0.
            for layer in self.layers:
                for rnn in layer:
                    with torch.no_grad():
                        rnn.bias_ih_l0[hidden_size : 2 * hidden_size].fill_(1.0)
                        rnn.bias_hh_l0[hidden_size : 2 * hidden_size].fill_(0.0)
        out_dim = hidden_size * dirs
        self.pool = MaskedPooling(self.pooling, out_dim) if self.pooling != "last" else None
        self.head = nn.Linear(out_dim, num_outputs)

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        check_positive(cfg, "embed_dim", "hidden_size", "num_layers")
        check_fraction(cfg, "dropout", "word_dropout")
        require(not (cfg.bidirectional and head == "lm"), "model.bidirectional=true lets a language model see "
                "the next character; use it only with a classification dataset (data=imdb).")
        require(not (cfg.tie_weights and head == "lm") or cfg.embed_dim == cfg.hidden_size,
                f"model.tie_weights=true needs model.embed_dim ({cfg.embed_dim}) == model.hidden_size "
                f"({cfg.hidden_size}).")

    @classmethod
    def describe(cls, m: dict) -> str:
        bi = "Bi" if m["bidirectional"] else ""
        per = " per direction" if bi else ""
        return f"{bi}{m['cell'].upper()} {m['num_layers']} x {m['hidden_size']}{per}, {m['pooling']} pooling"

    def input_embedding(self) -> nn.Module:
        return self.embed  # (B, T, E)

    def state_size(self, seq_len: int) -> int:
        """layers x hidden per direction, twice for an LSTM (h and c), whatever the length."""
        rnn = self.rnn if self.lm else self.layers[0][0]
        dirs = 2 if self.bidirectional else 1
        return self.num_layers * dirs * rnn.hidden_size * (2 if self.cell == "lstm" else 1)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state: State = None):
        """tokens (B, T) -> (logits, state). logits: (B, T, V) for lm, (B, C) for classify."""
        x = self.drop(embed_words(self.embed, tokens, self.word_dropout))  # (B, T, E)
        if self.lm:
            out, state = self.rnn(x, state)  # (B, T, H)
            return self.head(self.drop(out)), state

        B, T = tokens.shape
        lengths = lengths_or_full(tokens, lengths)
        rev = reverse_index(lengths, T) if self.bidirectional else None
        h = x
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = self.drop(h)  # between layers, as torch's stacked modules do
            outs = [self._run(layer[0], h, lengths)]  # (B, T, H)
            if self.bidirectional:
                outs.append(flip(self._run(layer[1], flip(h, rev), lengths), rev))
            h = torch.cat(outs, dim=-1)  # (B, T, H * dirs); garbage at padded positions only
        if self.pooling == "last":
            # forward: state after the last token; backward: state after reading back to token 0
            end = (lengths - 1).clamp(min=0)
            pooled = h[torch.arange(B, device=h.device), end]  # (B, H * dirs)
            if self.bidirectional:
                H = h.shape[-1] // 2
                pooled = torch.cat([pooled[:, :H], h[:, 0, H:]], dim=-1)
        else:
            pooled = self.pool(h, lengths)
        return self.head(self.drop(pooled)), None

    def _run(self, rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One direction of one layer over a right-padded batch -> (B, T, H), exact at valid positions."""
        pack = x.is_cuda if self.pack is None else self.pack
        if not pack:
            return rnn(x)[0]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out
