"""How far back does the loss reach? At every validation, the mean norm of the loss gradient with
respect to the input at each distance back from the answer (seqexp/gradients.py), as a plot and
scalars `gradient_distance/<d>`. On by default: it is the picture the memory lab is about, and
cheap -- one forward and backward on `rows` fixed validation rows, on the main process, without
touching the training (no parameter's .grad, no RNG)."""

from __future__ import annotations

import logging

from seqexp.errors import UserError
from seqexp.gradients import DISTANCES, fixed_rows, mean, measure
from seqexp.reports.base import Context, Report
from seqexp.visuals import figure_to_array, gradient_distance_figure

log = logging.getLogger("seqexp")


class GradientDistance(Report):
    name = "gradient_distance"

    def __init__(self, enabled: bool = True,
                 rows: int = 64):  # validation rows it measures (spread over the split, the same each time)
        super().__init__(enabled)
        if rows < 1:  # config.validate builds every report: refused before any data is read
            raise UserError(f"logging.gradient_distance.rows must be >= 1 (logging.gradient_distance.enabled=false "
                            f"turns the picture off), got {rows}.")
        self.rows = rows

    def applies(self, ctx: Context) -> bool:
        if not (self.enabled and ctx.logger.enabled):
            return False
        if ctx.model.input_embedding() is None:
            log.info("gradient_distance: %s has no per-position input vectors; no gradient-by-distance picture",
                     type(ctx.model).__name__)
            return False
        self.batches = fixed_rows(ctx.data, self.rows)
        return True

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if split != "val":
            return {}
        sums, counts = measure(ctx.model, ctx.data.task, self.batches, ctx.device)
        norms = mean(sums, counts)
        ctx.logger.image("gradient_distance/plot",
                         figure_to_array(gradient_distance_figure(norms, f"step {step}")), step)
        ctx.logger.scalars({f"gradient_distance/{d}": float(norms[d]) for d in DISTANCES
                            if d < len(counts) and counts[d] > 0}, step)
        return {}
