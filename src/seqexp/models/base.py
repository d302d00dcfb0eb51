"""What every model family provides to the shared code (train.py, the trainer, the commands).

A model is built with its config's plain values plus the runtime facts it asks for by name
(build.RUNTIME): `vocab_size`, `num_outputs`, `head` -- "lm": (B, T, V) logits, one row per
position, causal; "classify": (B, C) logits, one row per sequence, padding never reaching one --
and `max_len`, the longest input it will read at once (attention's context). It maps
`tokens (B, T)`, `lengths (B,)` or None, and a carried state to `(logits, state)`. The defaults
below suit a model that needs none of the optional parts; a family overrides what it uses.

A new family is one module in this package plus one YAML file in configs/model/: the contract
tests (tests/test_model_contract.py) find it and check it, on each head its `check_config`
accepts.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional

import torch.nn as nn
from omegaconf import DictConfig

from seqexp.errors import UserError, require


# how a classifier reduces its (B, T, H) states to (B, H): the final valid state (both directions'
# when bidirectional), a mean or max over valid positions, or a learned softmax over them
Pooling = Literal["last", "mean", "max", "attention"]


def check_fraction(cfg: DictConfig, *keys: str) -> None:
    """Dropout-like keys of a model config must be in [0, 1)."""
    for key in keys:
        require(0.0 <= cfg[key] < 1.0, f"model.{key} must be in [0, 1), got {cfg[key]}.")


def check_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        require(cfg[key] > 0, f"model.{key} must be positive, got {cfg[key]}.")


class SequenceModel(nn.Module):
    # True: the trainer carries `state` from one chunk of a stream to the next (truncated BPTT)
    stateful: bool = False
    # a stateful model's state layout: None, a tensor, or a tuple of tensors (LSTM's (h, c)), each
    # with the batch's rows on this dim, where DDP gathers it for checkpoints and shards it again
    # (distributed.py); torch's RNN states are (layers, B, H): 1. A stateful model must declare it.
    state_batch_dim: Optional[int] = None
    # longest input the model reads at once (attention: its window); None: no limit
    context_size: Optional[int] = None

    def prepare(self, batches: Callable[[], Iterable[dict]]) -> None:
        """Data-dependent set-up before the optimizer is built (the n-gram model's features).
        Called once on a fresh run, never on a resume: the checkpoint holds the result."""

    @classmethod
    def check_config(cls, cfg: DictConfig, head: str) -> None:
        """Cross-field checks of this model's config for a `head` ("lm" or "classify"), before any
        data is read (UserError): a family that cannot do a head refuses it here."""

    @classmethod
    def describe(cls, cfg: dict) -> str:
        """One line for a table of results: what this config of the family is."""
        return cls.__name__

    def input_embedding(self) -> Optional[nn.Module]:
        """The module whose output, (B, T, D) one vector per position, is the input every later
        layer reads (called once per forward). The gradient-by-distance picture (gradients.py)
        differentiates the loss with respect to it. None: the model has no per-position input
        vectors (a bag of n-grams), and the picture is skipped."""
        return None

    def state_size(self, seq_len: int) -> int:
        """Numbers of state, per sequence, that the model carries from what it has read to read
        position `seq_len` (the tokens before it): a recurrence's hidden (and cell) states whatever
        the length, attention's keys and values of every earlier position it can see. The memory
        lab plots recall against it (benchmarks/long_range.py, the Zoology/Based picture). A family
        that has no such state, or has not said, refuses in one line."""
        raise UserError(f"{type(self).__name__} does not define state_size(): the numbers it carries from one "
                        f"position to the next are not known.")
