"""What a task is: how a dataset's examples are scored. Shared code (the trainer, the commands,
the gradient picture, sharding) calls these members and never asks which task it is.

A dataset names its task (`task = LanguageModeling()`); a new task is one module in this
package with a subclass of `Task`. Reporting around evaluations (text samples, confusion
matrices, the test split) is not a task's job: see seqexp/reports/.

Batches are dicts (data/base.py): `tokens` (B, T) ids, `targets` (the task's shape), `lengths`
(B,) or absent, `carry`, `num_tokens`. Targets equal to IGNORE (-100) are skipped by loss and
metrics alike (padding, or positions without an answer).

Metrics are sums over the whole split divided once at the end, never means of batch means:
`batch_sums` for one batch, added over batches (and, under DDP, over ranks), then `metrics`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, ClassVar, Iterable, Literal, Optional

import torch
import torch.nn.functional as F

from seqexp.evaluation import outputs

IGNORE = -100  # target id that losses and metrics skip

# what a model is built for (its `head` runtime fact): "lm" -- (B, T, V) logits, one row per
# position, causal; "classify" -- (B, C) logits, one row per sequence (C = 1: a regression)
Head = Literal["lm", "classify"]


class Task:
    name: ClassVar[str]  # the run record's "task", e.g. "lm"
    head: ClassVar[Head]
    objective: ClassVar[str]  # the monitored metric unless trainer.monitor says otherwise, e.g. "val/loss"
    mode: ClassVar[str]  # "min" or "max": which way the objective is better
    # every validation metric it logs (as val/<name>) and which way is better (None: a count,
    # never monitored); trainer.monitor must name one of them
    metric_modes: ClassVar[dict[str, Optional[str]]]

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The mean training loss of a batch (a scalar), in float32 whatever the autocast dtype."""
        raise NotImplementedError

    def loss_terms(self, batch: dict) -> int:
        """How many terms the mean loss averages over (weighs micro-batches under accumulation)."""
        raise NotImplementedError

    def num_tokens(self, batch: dict) -> int:
        """Tokens a batch (or a rank's rows of it) trains on, for tokens/s."""
        raise NotImplementedError

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's loss at its answer, and (B,) where that answer is (-1: the row has none):
        the gradient-by-distance picture counts distances back from it (gradients.py)."""
        raise NotImplementedError

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """One batch's contribution to the metrics: tensors that add up over batches and ranks."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, torch.Tensor]) -> dict:
        """The split's metrics from its sums: floats and counts (and, for a classifier, the
        confusion matrix as a list of lists, which is logged as a picture, not a scalar)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- written once
    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, torch.Tensor]:
        """`batch_sums` added over some batches ({} when there is none)."""
        total: dict[str, torch.Tensor] = {}
        for batch, logits in outputs(model, batches, device, autocast):
            for k, v in self.batch_sums(logits, batch).items():
                total[k] = total[k] + v if k in total else v
        return total

    def evaluate(self, model, batches: Iterable[dict], device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict:
        return self.metrics(self.sums(model, batches, device, autocast))


# ----------------------------------------------------------------------------- helpers of tasks
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> cross-entropy where the target is not IGNORE, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def answer_count(batch: dict) -> int:
    """Targets that are not IGNORE: the terms of a per-position mean loss."""
    return int((batch["targets"] != IGNORE).sum())


def all_positions(batch: dict) -> int:
    """Tokens a model reads in a batch: the true lengths, padding left out."""
    lengths = batch.get("lengths")
    return int(lengths.sum()) if lengths is not None else batch["tokens"].numel()


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) the index of each row's last True, -1 where it has none."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, -1).amax(1)


def last_position(batch: dict) -> torch.Tensor:
    """(B,) each row's last real position: length - 1 (T - 1 when the batch has no lengths)."""
    tokens, lengths = batch["tokens"], batch.get("lengths")
    if lengths is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
    return lengths.to(tokens.device) - 1
