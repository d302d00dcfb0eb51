"""What every dataset provides to the shared code (train.py, the trainer, the commands).

A dataset is built with its config's plain values plus `seed` and, when a checkpoint is
rebuilt, `saved`: the `state()` that checkpoint stored (its vocabulary), so that ids keep their
meaning. It serves batches as dicts (`tokens`, `targets`, `lengths` or absent, `carry`,
`num_tokens`) and names its task, which decides the loss, the metrics and what is logged.
"""

from __future__ import annotations

from typing import Any, Iterator

from omegaconf import DictConfig

from seqexp.errors import UserError
from seqexp.monitor import task_metric_modes


class Dataset:
    task: Any  # a seqexp.tasks Task instance, e.g. LanguageModeling()
    splits: dict  # split name -> whatever the class keeps per split ("train", "val", maybe "test")

    def model_kwargs(self) -> dict:
        """Runtime facts every model is built with: vocab_size, num_outputs, task, pad_id, max_len."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint keeps to rebuild this data's encoding (`saved=`) and to recognise it."""
        raise NotImplementedError

    def num_batches(self, split: str, stateful: bool) -> int:
        raise NotImplementedError

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))

    @classmethod
    def text_encoder(cls, saved: dict):
        """A checkpoint's text pipeline without its corpus: `encode(str) -> (N,) ids`, `decode(ids)`."""
        raise UserError(f"{cls.__name__} runs cannot encode new text (no text encoder).")

    @classmethod
    def upgrade_config(cls, cfg: dict) -> dict:
        """A data config saved by an older seqexp, as today's code reads it."""
        return cfg

    @classmethod
    def metric_modes(cls, cfg: DictConfig) -> dict:
        """The validation metrics a run of this config logs (as val/<name>), each with which way is
        better ("min", "max", None): the names trainer.monitor may choose. Base: the task's."""
        return task_metric_modes(cls.task)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Cross-field checks of this dataset's config, before anything is read (UserError)."""
