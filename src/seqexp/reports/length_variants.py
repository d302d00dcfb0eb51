"""Metrics at other lengths: beside each evaluated split, its variants `<split>@<length>` (the
memory lab's `data.eval_lengths`), recorded with the suffix, e.g. `val/exact@512`. Every rank
evaluates them (the sums are added over ranks).

`logging.length_variants.validation=false` skips them at every validation and keeps them beside
the test split after training: at 16x the training length one pass over the variants reads ~30x
the tokens of the validation split, more than the training between two validations (the memory
lab's induction task, data_defaults/induction.yaml)."""

from __future__ import annotations

from seqexp.reports.base import Context, Report


class LengthVariants(Report):
    name = "length_variants"

    def __init__(self, enabled: bool = True,
                 validation: bool = True):  # false: beside the test split only, not at every validation
        super().__init__(enabled)
        self.validation = validation

    def applies(self, ctx: Context) -> bool:
        return self.enabled and any("@" in s for s in ctx.data.splits)

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if split == "val" and not self.validation:
            return {}
        more = {}
        for name in ctx.data.splits:
            if name.startswith(split + "@"):
                suffix = name[len(split):]  # "@512"
                more.update({f"{k}{suffix}": v for k, v in ctx.evaluate(name).items() if not isinstance(v, list)})
        return more
