"""A classifier's confusion matrix, as a picture, at every evaluation of every split."""

from __future__ import annotations

from seqexp.reports.base import Context, Report
from seqexp.tasks.classify import Classification


class Confusion(Report):
    name = "confusion"

    def applies(self, ctx: Context) -> bool:
        return self.enabled and isinstance(ctx.data.task, Classification) and ctx.logger.enabled

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        ctx.logger.confusion(f"{split}/confusion", metrics["confusion"], step, ctx.data.classes)
        return {}
