"""A classifier's most confidently wrong validation texts, at every validation (one more pass
over the split, in float32: the confidences are ranked)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from seqexp.evaluation import outputs
from seqexp.reports.base import Context, Report
from seqexp.tasks.classify import Classification
from seqexp.visuals import confidently_wrong


def predictions(model, batches: Iterable[dict], device, decode: Callable) -> tuple:
    """(N, C) float32 logits, (N,) labels and the N texts (decoded tokens) of some batches."""
    logits, labels, texts = [], [], []
    for batch, out in outputs(model, batches, device):
        logits.append(out.float().cpu())
        labels.append(batch["targets"].cpu())
        lengths = batch.get("lengths")
        for i, row in enumerate(batch["tokens"].tolist()):
            texts.append(decode(row[: int(lengths[i])] if lengths is not None else row))
    return torch.cat(logits), torch.cat(labels), texts


class WrongExamples(Report):
    name = "wrong_examples"

    def __init__(self, enabled: bool = True, count: int = 5):  # count: texts shown (0: none)
        super().__init__(enabled)
        self.count = count

    def applies(self, ctx: Context) -> bool:
        return self.enabled and self.count > 0 and isinstance(ctx.data.task, Classification) and ctx.logger.enabled

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if split == "val":
            logits, labels, texts = predictions(ctx.model, ctx.data.batches(split, stateful=ctx.model.stateful),
                                                ctx.device, ctx.data.decode)
            ctx.logger.text("wrong", confidently_wrong(logits, labels, texts, self.count, ctx.data.classes), step)
        return {}
