"""Metrics at other lengths: beside each evaluated split, its variants `<split>@<length>` (the
memory lab's `data.eval_lengths`), recorded with the suffix, e.g. `val/exact@512`. Every rank
evaluates them (the sums are added over ranks)."""

from __future__ import annotations

from seqexp.reports.base import Context, Report


class LengthVariants(Report):
    name = "length_variants"

    def applies(self, ctx: Context) -> bool:
        return self.enabled and any("@" in s for s in ctx.data.splits)

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        more = {}
        for name in ctx.data.splits:
            if name.startswith(split + "@"):
                suffix = name[len(split):]  # "@512"
                more.update({f"{k}{suffix}": v for k, v in ctx.evaluate(name).items() if not isinstance(v, list)})
        return more
