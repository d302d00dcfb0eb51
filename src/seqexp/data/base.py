"""What every dataset provides to the shared code (train.py, the trainer, the reports, the commands).

A dataset is built with its config's plain values plus `seed` and, when a checkpoint is
rebuilt, `saved`: the `state()` that checkpoint stored (its vocabulary), so that ids keep their
meaning. It serves batches as dicts and names its task (tasks/), which decides the loss and the
metrics. A new dataset is one module plus one YAML file (configs/data/).

Batches (`batches()`), a dict each:
- `tokens` (B, T) int64 ids; `lengths` (B,) the true lengths when rows are padded, else absent;
- `targets`: what the task scores -- (B, T) next ids for language modelling (IGNORE where there is
  none), (B,) labels for classification;
- `carry`: whether this batch continues the previous one's streams (truncated BPTT: a recurrent
  model starts from the state the last batch left), `num_tokens`: tokens it trains on;
- `rows` (B,): which examples of the split, when the data has fixed examples (`examples`).

Capabilities: a dataset overrides the methods it can do, and a command that needs one asks
`can(name)` and refuses in one line when it is missing: `encode` (text -> ids: sampling's
prompt), `examples` and `labels` (what an ensemble lines up), `text_encoder` (new text for
a checkpoint alone: predict, sample).
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig

from seqexp.errors import UserError
from seqexp.monitor import task_metric_modes
from seqexp.tasks.base import Task


class Dataset:
    task: ClassVar[Task]  # e.g. LanguageModeling()
    classes: ClassVar[Optional[Sequence[str]]] = None  # a classifier's class names, in label order
    splits: dict  # split name -> whatever the class keeps per split ("train", "val", maybe "test")
    batch_size: int

    def model_kwargs(self) -> dict:
        """Runtime facts every model is built with: vocab_size, num_outputs, head (the task's),
        and max_len (the longest input a model will read at once: attention's context)."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps to rebuild this data's encoding (`saved=`) and to recognise it:
        `kind`, the vocabulary, a content `fingerprint` (resume refuses other data)."""
        raise NotImplementedError

    def num_batches(self, split: str, stateful: bool) -> int:
        raise NotImplementedError

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """The split's batches from batch `start` on; training's order a pure function of (seed,
        epoch), so resuming needs only the position. `stateful`: the model carries state between
        batches (streams of consecutive chunks) or not (independent rows)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))

    # ---------------------------------------------------------------- capabilities
    def can(self, capability: str) -> bool:
        """Whether this dataset provides `capability` (a method of the list above it overrides)."""
        mine, base = getattr(type(self), capability), getattr(Dataset, capability)
        return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)  # (classmethods)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> (N,) ids, as the training text was encoded."""
        raise UserError(f"{type(self).__name__} does not encode text.")

    def examples(self, split: str) -> torch.Tensor:
        """(N,) an id for each example of the split, the same for any run of the same data and
        split, in the order batch["rows"] counts them."""
        raise UserError(f"{type(self).__name__} has no fixed examples.")

    def labels(self, split: str) -> torch.Tensor:
        """(N,) the split's labels, in the order of `examples`."""
        raise UserError(f"{type(self).__name__} has no labels.")

    @classmethod
    def text_encoder(cls, saved: dict):
        """A checkpoint's text pipeline without its corpus: `encode(str) -> (N,) ids`, `decode(ids)`."""
        raise UserError(f"{cls.__name__} runs cannot encode new text (no text encoder).")

    # ---------------------------------------------------------------- config
    @classmethod
    def upgrade_config(cls, cfg: dict) -> dict:
        """A data config saved by an older seqexp, as today's code reads it (config.upgrade)."""
        return cfg

    @classmethod
    def metric_modes(cls, cfg: DictConfig) -> dict:
        """The validation metrics a run of this config logs (as val/<name>), each with which way is
        better ("min", "max", None): the names trainer.monitor may choose. Base: the task's."""
        return task_metric_modes(cls.task)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Cross-field checks of this dataset's config, before anything is read (UserError)."""
