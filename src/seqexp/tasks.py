"""What differs between tasks: the loss on the head's output and the evaluation metrics.

Both heads output unnormalised logits, so both losses are cross-entropy (log-softmax + NLL).
Language-model padding is marked with target -100 and skipped by loss and metrics alike.
Metrics are sums over the whole split divided once at the end, never means of batch means:
`sums()` over some batches, `metrics()` of their sums -- under DDP the sums of every rank.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from seqexp.data.char import IGNORE


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class LanguageModeling:
    name = "lm"
    objective, mode = "val/loss", "min"  # nats per character

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, T, V), targets (B, T); float32 softmax even under autocast
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count, state = 0, None
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                logits, new_state = model(batch["tokens"], None, state if batch["carry"] else None)
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                     ignore_index=IGNORE, reduction="sum").double()
            count += batch["num_tokens"]
            state = new_state
        return {"loss": total, "tokens": count}

    def metrics(self, sums: dict) -> dict[str, float]:
        count = sums["tokens"]
        loss = float(sums["loss"]) / max(count, 1)
        return {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0)), "tokens": count}

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))


def confusion_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C) scores and (B,) labels -> (C, C) counts: rows true class, columns predicted."""
    C = logits.shape[-1]
    return torch.bincount(y * C + logits.argmax(-1), minlength=C * C).view(C, C)


class Classification:
    name = "classify"
    objective, mode = "val/acc", "max"

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, C) with C >= 2 and integer labels: softmax cross-entropy matches the head
        return F.cross_entropy(logits.float(), batch["targets"])

    @torch.no_grad()
    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        confusion = None  # (C, C): rows true class, columns predicted
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                logits, _ = model(batch["tokens"], batch.get("lengths"), None)
            y = batch["targets"]
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            counts = confusion_counts(logits, y)
            confusion = counts if confusion is None else confusion + counts
        return {"loss": total, "confusion": confusion}

    def metrics(self, sums: dict) -> dict[str, float]:
        confusion = sums["confusion"].cpu()
        n = int(confusion.sum())
        out = {"loss": float(sums["loss"]) / n, "acc": float(confusion.trace()) / n, "count": n}
        if confusion.shape == (2, 2):  # class 1 is the positive class
            out.update(tn=int(confusion[0, 0]), fp=int(confusion[0, 1]), fn=int(confusion[1, 0]),
                       tp=int(confusion[1, 1]))
        out["confusion"] = confusion.tolist()
        return out

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))


TASKS = {"lm": LanguageModeling, "classify": Classification}
