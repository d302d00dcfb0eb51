"""The run's record (RunDir.metrics): what it says, however the run ends, and the run's last line.

The record is rewritten after every evaluation (status "running"), when a stop signal saves
(status "preempted") and when training and its reports are done ("finished"). A run that ends
with an exception leaves it saying how -- "stopped: nonfinite", "interrupted" or "failed", with
the error -- never "running"; the rest stays what the last evaluation wrote, which describes
the last checkpoint. Only the main process writes. Strict JSON: a NaN metric is null.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from seqexp.errors import UserError
from seqexp.guard import NonFiniteError
from seqexp.preempt import Preempted
from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")


@dataclass
class Progress:
    """How far the run is: counters and results, in every checkpoint's trainer state."""
    step: int = 0  # optimizer steps taken (skipped batches included)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed (micro-batches: trainer.accumulate per step)
    best: Optional[float] = None  # best value of the monitored metric so far (finite, or None)
    best_step: Optional[int] = None
    best_metrics: dict = field(default_factory=dict)  # "val/..." at best_step
    last_metrics: dict = field(default_factory=dict)  # "val/..." of the latest evaluation
    stopped_early: Optional[int] = None  # the step at which patience ran out
    target_step: Optional[int] = None  # the step of the first evaluation that reached trainer.target
    target_train_s: Optional[float] = None  # and the training time (evaluation left out) to it
    elapsed: float = 0.0  # wall seconds in fit() before this process
    eval_s: float = 0.0  # of which evaluating and checkpointing (not training)


class RunRecord:
    def __init__(self, run_dir: RunDir, *, is_main: bool, task: str, num_params: int, steps_per_epoch: int,
                 monitor, target: Optional[float] = None):
        self.run_dir, self.is_main, self.task, self.target = run_dir, is_main, task, target
        self.num_params, self.steps_per_epoch, self.monitor = num_params, steps_per_epoch, monitor
        self.extra: dict = {}  # what the reports add after training (e.g. test metrics)
        self.written: Optional[dict] = None  # the record last written by this process

    def summary(self, status: str, p: Progress, *, skipped: int, wall_s: float, train_s: float) -> dict:
        return {
            "status": status,
            "task": self.task,
            "objective": {"metric": self.monitor.metric, "mode": self.monitor.mode, "best": p.best},
            # patience ran out: the step it stopped at (else null)
            "stopped_early": (None if p.stopped_early is None else
                              {"step": p.stopped_early, "patience": self.monitor.patience,
                               "min_delta": self.monitor.min_delta}),
            # trainer.target: whether the monitored metric reached it, and at which step (timing: after how long)
            "target": (None if self.target is None else
                       {"metric": self.monitor.metric, "value": self.target, "reached": p.target_step is not None,
                        "step": p.target_step}),
            "final": p.last_metrics,
            "best": p.best_metrics,
            "best_step": p.best_step,
            "steps": p.step,
            "epochs": round(p.step / self.steps_per_epoch, 4),
            "skipped_batches": skipped,
            "num_params": self.num_params,
            **self.extra,
            # the only entries that differ between two runs of the same config
            "timing": {"wall_time_s": round(wall_s, 3), "train_time_s": round(train_s, 3),
                       **({} if p.target_train_s is None else {"target_train_time_s": round(p.target_train_s, 3)})},
        }

    def write(self, summary: dict) -> None:
        if self.is_main:
            self.written = summary  # what the record says, should the run fail before the next write
            self.run_dir.write_metrics(summary)

    @contextmanager
    def ending(self, summary) -> Iterator[None]:
        """However the block ends, the record says how (`summary(status)`: the record to write
        when nothing was written yet). Preempted: the trainer has written "preempted" itself."""
        try:
            yield
        except Preempted:
            raise
        except BaseException as e:
            status = ("stopped: nonfinite" if isinstance(e, NonFiniteError) else
                      "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
            first = (str(e).strip() or "-").splitlines()[0]
            error = first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
            try:
                if self.is_main:
                    self.run_dir.write_metrics({**(self.written or summary(status)), "status": status, "error": error})
            except Exception as again:  # e.g. the directory that has just refused a checkpoint
                log.warning("%s not updated (%s)", self.run_dir.metrics.name, again)
            raise


def closing_line(summary: dict, run_dir) -> str:
    """The run's last line: the best monitored metric, its test counterpart if any, where it all is."""
    objective, step = summary["objective"], summary["best_step"]
    metric, best = objective["metric"], objective["best"]
    line = f"finished: best {metric} {best:.4f} at step {step}" if best is not None else f"finished: no finite {metric}"
    test = summary.get("test")
    key = "test/" + metric.partition("/")[2]
    if isinstance(test, dict) and isinstance(test.get(key), float):
        line += f"; {key} {test[key]:.4f} (best checkpoint)"
    target = summary.get("target")
    if target:
        line += (f"; reached {target['metric']} {target['value']:g} at step {target['step']} "
                 f"({summary['timing']['target_train_time_s']:.1f} s of training)" if target["reached"] else
                 f"; did not reach {target['metric']} {target['value']:g}")
    if summary.get("stopped_early"):
        line += f"; stopped early at step {summary['stopped_early']['step']}"
    return f"{line}; run directory {run_dir}"
