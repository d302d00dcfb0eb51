"""The test split, held out until training is over: evaluated once, on the best checkpoint's weights, with
every report of an evaluation (its confusion matrix, its other lengths); recorded as test/* in
the run's record and in TensorBoard at the best step."""

from __future__ import annotations

import logging

from seqexp.reports.base import Context, Report

log = logging.getLogger("seqexp")


class TestOnBest(Report):
    name = "test_split"
    loads_best = True

    def applies(self, ctx: Context) -> bool:
        return self.enabled and "test" in ctx.data.splits

    def splits_after_training(self, ctx: Context) -> tuple[str, ...]:
        return ("test",)

    def after_training(self, ctx: Context) -> dict:
        if ctx.best_step is None:  # no finite validation metric, so no best checkpoint
            log.warning("no best checkpoint (no finite %s): the test split is not evaluated", "validation metric")
            return {}
        ctx.model.load_state_dict(ctx.best_weights())
        log.info("evaluating the test split on the best checkpoint (step %s): %d batches", ctx.best_step,
                 ctx.data.num_batches("test", stateful=ctx.model.stateful))  # a long one shows progress too
        metrics = ctx.report("test", ctx.best_step)
        test = {f"test/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        ctx.logger.scalars(test, ctx.best_step)
        log.info("test (best checkpoint, step %d): %s", ctx.best_step,
                 "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
        return {"test": test}
