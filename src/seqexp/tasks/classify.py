"""Sequence classification: one label per sequence, softmax cross-entropy, accuracy and the
confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqexp.tasks.base import Task, all_positions, last_position


def confusion_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C) scores and (B,) labels -> (C, C) counts: rows true class, columns predicted."""
    C = logits.shape[-1]
    return torch.bincount(y * C + logits.argmax(-1), minlength=C * C).view(C, C)


class Classification(Task):
    name = "classify"
    head = "classify"  # (B, C) logits, one row per sequence
    objective, mode = "val/acc", "max"
    # tn/fp/fn/tp too when binary: counts, not monitored
    metric_modes = {"loss": "min", "acc": "max", "count": None}

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, C) with C >= 2 and integer labels: softmax cross-entropy matches the head
        return F.cross_entropy(logits.float(), batch["targets"])

    def loss_terms(self, batch: dict) -> int:
        return len(batch["targets"])  # one label per row

    def num_tokens(self, batch: dict) -> int:
        return all_positions(batch)

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's loss, anchored on its last real token (length - 1): a review's distances
        count back from its own end, never from padding."""
        return F.cross_entropy(logits.float(), batch["targets"], reduction="none"), last_position(batch)

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        y = batch["targets"]
        return {"loss": F.cross_entropy(logits.float(), y, reduction="sum").double(),
                "confusion": confusion_counts(logits, y)}

    def metrics(self, sums: dict) -> dict:
        confusion = sums["confusion"].cpu()
        n = int(confusion.sum())
        out = {"loss": float(sums["loss"]) / n, "acc": float(confusion.trace()) / n, "count": n}
        if confusion.shape == (2, 2):  # class 1 is the positive class
            out.update(tn=int(confusion[0, 0]), fp=int(confusion[0, 1]), fn=int(confusion[1, 0]),
                       tp=int(confusion[1, 1]))
        out["confusion"] = confusion.tolist()
        return out
