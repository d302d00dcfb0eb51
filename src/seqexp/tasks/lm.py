"""Next-token language modelling: cross-entropy at every position, in nats per token.

Both heads output unnormalised logits, so the loss is cross-entropy (log-softmax + NLL). The
last evaluation rows are padded with IGNORE targets, which loss and metrics skip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqexp.tasks.base import IGNORE, Task, answer_count, last_true, token_cross_entropy


class LanguageModeling(Task):
    name = "lm"
    head = "lm"
    objective, mode = "val/loss", "min"  # nats per character
    metric_modes = {"loss": "min", "bpc": "min", "ppl": "min", "tokens": None}

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return token_cross_entropy(logits, batch["targets"])  # logits (B, T, V), targets (B, T)

    def loss_terms(self, batch: dict) -> int:
        return answer_count(batch)  # every position but the padding

    def num_tokens(self, batch: dict) -> int:
        return answer_count(batch)  # one per target

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A language model's answer is its last prediction: the loss at the last position with a
        target, nothing else."""
        valid = batch["targets"] != IGNORE  # (B, T)
        anchor = last_true(valid)  # (B,)
        rows = torch.arange(len(anchor), device=anchor.device)
        at = anchor.clamp(min=0)
        loss = F.cross_entropy(logits[rows, at].float(), batch["targets"][rows, at].clamp(min=0), reduction="none")
        return loss * (anchor >= 0), anchor

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": token_cross_entropy(logits, batch["targets"], reduction="sum").double(),
                "tokens": torch.tensor(batch["num_tokens"])}

    def metrics(self, sums: dict) -> dict:
        count = int(sums["tokens"])
        loss = float(sums["loss"]) / max(count, 1)
        return {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0)), "tokens": count}
