"""A task from outside the package: how many times does token 1 occur? One module, nothing else.

The answer is a class per count (0..C-1): a classifier's head, scored by cross-entropy, exact
accuracy and the mean absolute error of the predicted count -- the metric a counting task is
judged by, which `trainer.monitor=val/mae` may then choose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqexp.tasks.base import Task, all_positions, last_position


class Counting(Task):
    name, head = "count", "classify"
    objective, mode = "val/mae", "min"
    metric_modes = {"loss": "min", "acc": "max", "mae": "min", "count": None}

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["targets"])  # logits (B, C), targets (B,) counts

    def loss_terms(self, batch: dict) -> int:
        return len(batch["targets"])

    def num_tokens(self, batch: dict) -> int:
        return all_positions(batch)

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(logits.float(), batch["targets"], reduction="none"), last_position(batch)

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        y, guess = batch["targets"], logits.argmax(-1)
        return {"loss": F.cross_entropy(logits.float(), y, reduction="sum").double(),
                "counts": torch.stack([(guess == y).sum(), (guess - y).abs().sum(), y.new_tensor(len(y))])}

    def metrics(self, sums: dict) -> dict:
        right, off, n = (int(c) for c in sums["counts"].cpu())
        return {"loss": float(sums["loss"]) / n, "acc": right / n, "mae": off / n, "count": n}
