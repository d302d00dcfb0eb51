"""How far back does the loss reach? At every validation, the mean norm of the loss gradient with
respect to the input at each distance back from the answer (seqexp/gradients.py), as a plot and
scalars `gradient_distance/<d>`. On by default: it is the picture the memory lab is about, and
cheap -- one forward and backward on `rows` fixed validation rows, on the main process, without
touching the training (no parameter's .grad, no RNG).

The run's record (metrics.json) keeps two whole curves, `gradient_distance: {start, end}`, each
`{step, norm}` with `norm[d]` the mean norm d positions back (null where no row reaches): at the
initial weights (measured when the report is set up, before the first step: the weights a
resume rebuilds too, from the same seed) and at the final ones. Their ratio is what training did
to the reach of the loss; the memory lab's table and its all-families picture read them
(benchmarks/long_range.py)."""

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
        self.start = self.curve(ctx, 0)
        return True

    def curve(self, ctx: Context, step: int) -> dict:
        """The mean norm at every distance, as the record keeps it: {step, norm: [d = 0, 1, ...]}."""
        return {"step": step, "norm": mean(*measure(ctx.model, ctx.data.task, self.batches, ctx.device)).tolist()}

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

    def after_training(self, ctx: Context) -> dict:
        # the final weights (a report that loads best.pt runs after this one, Reports.after_training)
        return {"gradient_distance": {"start": self.start, "end": self.curve(ctx, ctx.step)}}
