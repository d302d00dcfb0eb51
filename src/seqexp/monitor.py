"""The monitored validation metric: which one (`trainer.monitor`), which way is better
(`trainer.mode`), early stopping (`trainer.patience`, `trainer.min_delta`), and the target
(`trainer.target`).

The monitored metric chooses the best checkpoint, is what the run's record calls "objective" (and so what
sweeps summarise and the Optuna sweeper optimises). Its name is checked against what the task
logs before any data is read: the data class's `metric_modes(cfg)` (by default the task's
`metric_modes`; the memory lab adds each metric at every `data.eval_lengths`, e.g. val/exact@200).

Mode, when `trainer.mode` is null: the task's own direction for that metric (`metric_modes`),
else "min" for a name containing "loss" and "max" for any other.

Patience counts evaluations whose value did not beat the reference by more than `min_delta`;
the reference is the value of the last evaluation that did (so many tiny gains do not reset the
count forever). The best checkpoint still follows every strict improvement. The counter and the reference
are in the trainer's state, so a resume mid-countdown stops where the straight run stops.
"""

from __future__ import annotations

import math
from typing import Optional

from seqexp.errors import UserError


def task_metric_modes(task) -> dict:
    """The validation metrics a task logs (name without val/ -> "min"|"max"|None); a task that does
    not list its metrics can be monitored on its objective alone."""
    return getattr(task, "metric_modes", None) or {task.objective.removeprefix("val/"): task.mode}


def metric_and_mode(t, task, modes: Optional[dict] = None) -> tuple[str, str]:
    """(metric, "min"|"max") from the trainer config and the data's task; refuses a name not in
    `modes` (what the data logs: `Dataset.metric_modes(cfg)`; default: the task's own metrics)."""
    metric = t.get("monitor") or task.objective
    modes = modes or task_metric_modes(task)
    names = [f"val/{k}" for k in modes]
    if metric not in names:
        raise UserError(f"trainer.monitor={metric} is not a metric this task ({task.name}) logs; "
                        f"choose one of {', '.join(names)}.")
    mode = t.get("mode")
    if mode is None:
        mode = modes[metric.removeprefix("val/")] or ("min" if "loss" in metric else "max")
    return metric, str(mode)


class Monitor:
    def __init__(self, metric: str, mode: str, patience: int = 0, min_delta: float = 0.0):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.reference: Optional[float] = None  # the last value that improved by more than min_delta
        self.wait = 0  # evaluations since then

    def better(self, value: float, than: Optional[float], by: float = 0.0) -> bool:
        if not math.isfinite(value):  # a NaN is never best
            return False
        if than is None:
            return True
        return value < than - by if self.mode == "min" else value > than + by

    def update(self, value: float) -> None:
        """Count one evaluation towards patience."""
        if self.better(value, self.reference, self.min_delta):
            self.reference, self.wait = value, 0
        else:
            self.wait += 1

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience

    def reaches(self, value: float, target: Optional[float]) -> bool:
        """Whether `value` is at the target or beyond it, the good way (never for a NaN)."""
        if target is None or not math.isfinite(value):
            return False
        return value <= target if self.mode == "min" else value >= target

    def state_dict(self) -> dict:
        return {"reference": self.reference, "wait": self.wait}

    def load_state_dict(self, sd: dict) -> None:
        self.reference, self.wait = sd["reference"], sd["wait"]
