"""What a report is: work around evaluations that shows what a model does -- a text sample, a
confusion matrix, the most confidently wrong examples, metrics at other lengths, the test split
on the best weights, pictures for TensorBoard.

A report gets a narrow `Context` (the model, the data, the logger and an evaluation function),
returns metrics, and never changes the run: the trainer logs and records what it returns.
A new report is one module in this package with a subclass of `Report`; its constructor's
parameters are its settings, `logging.<name>.<setting>` in the config (config.py composes them),
each with its default written once, in the constructor.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar, Optional

import torch


@dataclass
class Context:
    """What every report may use. `model` holds the weights being evaluated (the average, under
    trainer.ema). Under DDP every rank runs the reports; only the main process's logger writes."""
    model: torch.nn.Module
    data: object  # a seqexp.data.base.Dataset
    logger: object  # a seqexp.logger.Logger (disabled: every call does nothing)
    device: torch.device
    seed: int  # the run's trainer.seed
    is_main: bool
    quiet: bool  # a sweep's job: what only a person watching would read is not printed
    evaluate: Callable[[str], dict]  # one split's metrics, from the one evaluation loop (summed over ranks)
    # `split` evaluated with every report's after_evaluation, as the run records an evaluation
    report: Callable[[str, int], dict]
    best_weights: Callable[[], dict]  # the best checkpoint's weights (a collective under DDP: all ranks call it)
    step: int = 0  # after training: the last step taken
    best_step: Optional[int] = None  # after training: the step the best checkpoint was saved at


class Report:
    name: ClassVar[str]  # its settings' key: logging.<name>
    loads_best: ClassVar[bool] = False  # after_training puts the best checkpoint's weights in the model: it runs last

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def applies(self, ctx: Context) -> bool:
        """Whether this run gets the report (asked once, before training): its setting, and what
        the model and data can do."""
        return self.enabled

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        """After `split` was evaluated at `step` (`metrics`: its own); -> metrics to add to it."""
        return {}

    def after_training(self, ctx: Context) -> dict:
        """Once training is over, with the final weights (averaged) in the model; -> entries for
        the run's record."""
        return {}

    def splits_after_training(self, ctx: Context) -> tuple[str, ...]:
        """The splits after_training will evaluate: the plan line and the time estimate say so."""
        return ()


@lru_cache(maxsize=None)
def report_classes() -> tuple[type[Report], ...]:
    """Every report of this package, one per module, by module name."""
    from seqexp import reports

    found = []
    for info in pkgutil.iter_modules(reports.__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"seqexp.reports.{info.name}")
        found += [c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Report) and c is not Report and c.__module__ == module.__name__]
    return tuple(found)


class Reports:
    """The reports that apply to one run, built from its `logging` settings."""

    def __init__(self, settings, ctx: Context):
        self.ctx = ctx
        self.active = []
        for cls in report_classes():
            node = settings.get(cls.name) if hasattr(settings, "get") else None
            report = cls(**({} if node is None else dict(node)))
            if report.applies(ctx):
                self.active.append(report)

    def after_evaluation(self, split: str, metrics: dict, step: int) -> dict:
        """Every report's metrics for this evaluation, added to `metrics` (each sees the ones before)."""
        metrics = dict(metrics)
        for r in self.active:
            metrics.update(r.after_evaluation(self.ctx, split, metrics, step))
        return metrics

    def after_training(self, step: int, best_step: Optional[int]) -> dict:
        self.ctx.step, self.ctx.best_step = step, best_step
        record = {}
        for r in sorted(self.active, key=lambda r: r.loads_best):  # stable: module order otherwise
            record.update(r.after_training(self.ctx))
        return record

    def splits_after_training(self) -> tuple[str, ...]:
        return tuple(s for r in self.active for s in r.splits_after_training(self.ctx))
