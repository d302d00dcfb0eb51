"""Per-step learning-rate schedules, as multipliers of the optimizer's lr.

Each returns a `LambdaLR`; its state is only the step count, so resuming needs nothing more.
`total_steps` is a runtime fact (max_steps, or epochs x batches per epoch) passed at build time.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(ok: bool, message: str) -> None:
    if not ok:  # build.check_optimization turns this into a one-line config error
        raise ValueError(message)


def _warmup(step: int, warmup_steps: int) -> float:
    # linear from 1/warmup to 1: step 0 already learns a little
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    _check(warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {warmup_steps}.")
    return LambdaLR(optimizer, lambda s: _warmup(s, warmup_steps))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1) -> LambdaLR:
    _check(warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {warmup_steps}.")
    _check(0.0 <= min_lr_ratio <= 1.0, f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")

    def factor(s: int) -> float:
        if s < warmup_steps:
            return _warmup(s, warmup_steps)
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, step_size: int = 1000,
         gamma: float = 0.5) -> LambdaLR:
    _check(warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {warmup_steps}.")
    _check(step_size > 0 and gamma > 0, f"scheduler.step_size and gamma must be positive, got {step_size}, {gamma}.")
    return LambdaLR(optimizer, lambda s: _warmup(s, warmup_steps) * gamma ** (s // step_size))
