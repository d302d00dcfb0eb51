"""What a run is about to do, and how long it will take: two or three log lines, no decisions.

Before training, one line with the plan (optimizer steps, epochs, evaluations, checkpoints, the
test split at the end), e.g.

    plan: 1,408 steps (4 epochs of 352), 8 evaluations, a checkpoint every 200 steps, then the test split on the best checkpoint

After the first logging window, the training time left, from that window's seconds per step;
after the first evaluation, the evaluation time left (and the test split's, scaled by its number
of batches from the validation pass). Each is printed once per process: a resumed run plans and
estimates what is left.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("seqexp")


def duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 2 h 05 min."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def epochs(steps: int, steps_per_epoch: int) -> str:
    """`4 epochs of 352`, `1 epoch of 352`, `0.43 of an epoch of 1,390`, `2.5 epochs of 352`."""
    e = steps / steps_per_epoch
    if e < 1:
        return f"{e:.2g} of an epoch of {steps_per_epoch:,}"
    count = f"{int(e):,}" if e == int(e) else f"{e:.3g}"
    return f"{count} epoch{'' if e == 1 else 's'} of {steps_per_epoch:,}"


def evaluations(start: int, total: int, every: int) -> int:
    """Evaluations at the steps s in (start, total]: every `every` steps, and at the last step."""
    if total <= start:
        return 0
    return total // every - start // every + (1 if total % every else 0)


def plan_line(*, start: int, total: int, steps_per_epoch: int, accumulate: int, eval_every: int,
              checkpoint_every: int, keep_last: int, max_time_s: float, after: tuple[str, ...] = (),
              target: str = "") -> str:
    """`after`: the splits evaluated once training is over (reports.base.Report.splits_after_training);
    `target`: "val/exact 0.99" when training stops once the monitored metric reaches it."""
    micro = f" of {accumulate} micro-batches" if accumulate > 1 else ""  # steps are optimizer steps
    if start:  # a resumed run: what is left
        steps = f"{total - start:,} more steps{micro} ({start:,} -> {total:,}; {epochs(total, steps_per_epoch)})"
    else:
        steps = f"{total:,} steps{micro} ({epochs(total, steps_per_epoch)})"
    parts = [steps]
    if max_time_s:  # the budget may end training first: the count of evaluations is not known
        parts = [f"at most {duration(max_time_s)} of training", "up to " + steps,
                 f"an evaluation every {eval_every:,} steps and at the end"]
    else:
        n = evaluations(start, total, eval_every)
        parts.append(f"{n} evaluation{'' if n == 1 else 's'}")
    if checkpoint_every < total:
        parts.append(f"a checkpoint every {checkpoint_every:,} steps" + (f" (the newest {keep_last} kept)"
                                                                        if keep_last else ""))
    if target:
        parts[0] = ("until " if not max_time_s else "") + f"{target} or " + parts[0]
    line = "plan: " + ", ".join(parts)
    return line + "".join(f", then the {split} split on the best checkpoint" for split in after)


class Estimate:
    """`window()` after each logging window and `evaluated()` after each evaluation print their
    estimate the first time only (on the main process)."""

    def __init__(self, *, start: int, total: int, eval_every: int, max_time_s: float, train_s: float,
                 show: bool, test_batches: int = 0):
        self.start, self.total, self.eval_every, self.max_time_s = start, total, eval_every, max_time_s
        self.train_s0 = train_s
        self.test_batches = test_batches  # > 0: the test split follows training, this many batches
        self.said_training = self.said_evaluation = not show

    def window(self, step: int, train_s: float) -> None:
        if self.said_training or step <= self.start:
            return
        self.said_training = True
        per_step = (train_s - self.train_s0) / (step - self.start)
        left = (self.total - step) * per_step
        budget = self.max_time_s - train_s if self.max_time_s else math.inf
        bound = " (max_time_s)" if budget < left else ""
        log.info("estimate: training about %s more%s (%.3g s/step in the first logging window)",
                 duration(min(left, budget)), bound, per_step)

    def evaluated(self, step: int, seconds: float, val_forward_s: float, val_batches: int) -> None:
        """`seconds`: the whole evaluation (metrics, reports, checkpoints); `val_forward_s`: its
        forward pass over `val_batches` batches, which scales to the test split."""
        if self.said_evaluation:
            return
        self.said_evaluation = True
        n = evaluations(step, self.total, self.eval_every)
        parts = [f"evaluation about {duration(n * seconds)} more ({n} x {seconds:.3g} s)"] if n else []
        if self.test_batches and val_batches:
            parts.append(f"the test split about {duration(val_forward_s * self.test_batches / val_batches)}")
        if parts:
            log.info("estimate: %s", "; ".join(parts))
