"""Weight and gradient histograms at every validation. Off by default: large event files."""

from __future__ import annotations

from seqexp.reports.base import Context, Report


class Histograms(Report):
    name = "histograms"

    def __init__(self, enabled: bool = False):
        super().__init__(enabled)

    def applies(self, ctx: Context) -> bool:
        return self.enabled and ctx.logger.enabled

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if split == "val":
            for name, p in ctx.model.named_parameters():
                ctx.logger.histogram(f"weights/{name}", p.detach(), step)
                if p.grad is not None:  # the last training step's (clipped) gradients
                    ctx.logger.histogram(f"grads/{name}", p.grad, step)
        return {}
