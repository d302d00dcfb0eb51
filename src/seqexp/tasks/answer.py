"""Answers at a few positions (the memory lab's copy, selective copy and recall, data/memory.py).

Every position gets logits, as in language modelling, but only a few hold an answer (the copied
symbols, the recalled values); every other target is IGNORE, so loss and metrics are taken there
alone -- a mask, not padding. The answers come after what they depend on, so a causal model can
give them. Metrics: cross-entropy per answer token, per-token accuracy, and whole-answer exact
match (every answer position of a row right).
"""

from __future__ import annotations

import torch

from seqexp.tasks.base import IGNORE, Task, all_positions, answer_count, token_cross_entropy


class AnswerPositions(Task):
    name, head = "answer", "lm"
    objective, mode = "val/loss", "min"  # nats per answer token: smooth, unlike exact match
    metric_modes = {"loss": "min", "acc": "max", "exact": "max", "count": None}

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return token_cross_entropy(logits, batch["targets"])  # at the answers only

    def loss_terms(self, batch: dict) -> int:
        return answer_count(batch)

    def num_tokens(self, batch: dict) -> int:
        return all_positions(batch)  # every position of every row is read

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mean loss over its answer positions, anchored on the first of them:
        distances count back from where the answer starts."""
        y = batch["targets"]  # (B, T)
        answer = y != IGNORE
        T = y.shape[1]
        first = torch.where(answer, torch.arange(T, device=y.device), T).amin(1)  # (B,)
        anchor = torch.where(first < T, first, -1)
        per_token = token_cross_entropy(logits, y, reduction="none").view_as(y)  # (B, T), 0 off the answer
        return per_token.sum(1) / answer.sum(1).clamp(min=1), anchor

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        y = batch["targets"]  # (B, T)
        answer = y != IGNORE
        right = (logits.argmax(-1) == y) & answer
        exact = (right | ~answer).all(1) & answer.any(1)  # (B,): every answer of the row
        # right tokens, answer tokens, exact rows, rows with an answer
        counts = torch.stack([right.sum(), answer.sum(), exact.sum(), answer.any(1).sum()])
        return {"loss": token_cross_entropy(logits, y, reduction="sum").double(), "counts": counts}

    def metrics(self, sums: dict) -> dict:
        right, answers, exact, rows = (int(c) for c in sums["counts"].cpu())
        return {"loss": float(sums["loss"]) / max(answers, 1), "acc": right / max(answers, 1),
                "exact": exact / max(rows, 1), "count": rows}
