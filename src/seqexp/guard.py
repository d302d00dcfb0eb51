"""The non-finite guard: nothing non-finite is ever trained on, averaged or saved, and the hot
loop reads nothing back from the device to make sure of it.

Each step computes an `ok` flag on the device -- loss, gradient norm and the previous update's
weights all finite (under DDP: on every rank) -- and the update is skipped on the device when it
is false:
- a fused optimizer (torch's Adam, AdamW, Adagrad, SGD built with fused=True) takes it as
  `found_inf`, as the fp16 grad scaler has it do: weights, moments and step count stay exactly
  as they were;
- fp16: the bad step's gradients are made NaN, so that the scaler's own check skips it;
- any other optimizer (RMSprop, foreach and for-loop kernels) cannot skip on a device flag: the
  step reads the flag on the host before updating, as every step used to.
The verdicts go into a small device buffer, one row per step, read with the logging window's
read and before any evaluation or save (`settle`): then `trainer.nonfinite=skip` counts and
logs each skipped step at its own step, `stop` stops at the first, before anything is
evaluated or written. A finite loss and gradient can still make the weights infinite (a huge
lr x weight decay); no policy can undo an update, so that stops the run.

The private torch APIs this needs are here and nowhere else (tests/test_nonfinite_guard.py
checks that a torch upgrade keeps them): `Optimizer._step_supports_amp_scaling` and the
`found_inf` attribute protocol of fused optimizers, `torch._foreach_norm` and `_foreach_mul_`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from seqexp.errors import UserError

log = logging.getLogger("seqexp")


class NonFiniteError(UserError):
    exit_code = 3


# ----------------------------------------------------------------------------- torch's private parts
def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips an update on a device flag (`found_inf`): the fused kernels."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_unless(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """A fused optimizer's update, or none at all when `ok` is false (decided on the device): the
    kernel leaves weights, moments and step count as they are when found_inf is 1 (and undoes its
    step increment)."""
    optimizer.found_inf = (~ok).float()
    try:
        scaler.step(optimizer)  # (disabled scaler: optimizer.step())
    finally:
        del optimizer.found_inf


def all_finite(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A device flag: every tensor finite. Finite weights <=> finite 2-norms, one kernel for all."""
    return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=dtype)).isfinite().all()


def poison_unless(tensors: list[torch.Tensor], ok: torch.Tensor) -> None:
    """Multiply every tensor by 1 where ok, else by NaN (fp16: the scaler then skips the step)."""
    torch._foreach_mul_(tensors, torch.where(ok, 1.0, math.nan))


# ----------------------------------------------------------------------------- the guard
class NonFiniteGuard:
    def __init__(self, policy: str, *, log_every: int, params: list[torch.nn.Parameter], device: torch.device,
                 optimizer: torch.optim.Optimizer, logger, last_good: Callable[[], Path]):
        self.policy, self.optimizer, self.logger, self.last_good = policy, optimizer, logger, last_good
        self.checked = [p for p in params if p.numel()]
        # The 2-norm in float64 is exact for any finite float32 weights (squares stay below 1e77) and
        # ~7x cheaper on CPU than the inf-norm, which has no fast kernel there (2.5 against 0.35 ms a
        # step for nanoGPT's CPU shape); MPS has no float64, and its float32 2-norm overflows only
        # for weights near 1e19.
        self.norm_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.skips_on_device = skips_on_device(optimizer)
        self.skipped = 0  # batches dropped by nonfinite=skip
        # whether the weights after the latest update are finite: read with the next step's verdict
        self.weights_ok = torch.ones((), dtype=torch.bool, device=device)
        # one row per step since the last read: [not ok, loss, grad norm, weights finite before it]
        self.rows = torch.zeros(max(log_every, 1), 4, device=device)
        self.pending = 0  # rows written since the last read
        self.first = 0  # the step that row 0 describes

    def verdict(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's `ok` flag (the caller all-reduces it under DDP)."""
        ok = torch.isfinite(loss) & self.weights_ok
        return ok if grad_norm is None else ok & torch.isfinite(grad_norm)

    def update(self, scaler: torch.amp.GradScaler, ok: torch.Tensor) -> None:
        """The optimizer's update, or, when `ok` is false, none at all."""
        if scaler.is_enabled():
            scaler.step(self.optimizer)  # skipped by the scaler: the gradients were made NaN
        elif self.skips_on_device and self.optimizer.state:
            # not on the first step, which creates the state: torch's fused SGD with momentum then
            # leaves its buffers uninitialised (empty_like) when that step is skipped
            step_unless(scaler, self.optimizer, ok)
        elif bool(ok):  # the host read: this optimizer cannot skip on a device flag
            scaler.step(self.optimizer)
        else:
            self.settle()  # nonfinite=stop stops here, at the bad step
        self.weights_ok = all_finite(self.checked, self.norm_dtype)

    def record(self, step: int, ok: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step `step`'s verdict into the buffer, on the device (before its update)."""
        if self.pending == len(self.rows):  # (the window is longer than log_every: e.g. a resume)
            self.settle()
        if self.pending == 0:
            self.first = step
        self.rows[self.pending] = torch.stack([(~ok).float(), loss.detach().float(), grad_norm.detach().float(),
                                               self.weights_ok.float()])
        self.pending += 1

    def unread(self) -> torch.Tensor:
        """The rows since the last read, flat: read by the caller with its own read (log window)."""
        return self.rows[: self.pending].flatten()

    def settle(self, rows: Optional[list] = None) -> None:
        """Act on the non-finite steps since the last read, in order: skip (count, log) or stop.
        `rows`: the rows if the caller has read them (`unread`) with its own read; else one read here."""
        if rows is None:
            rows = self.rows[: self.pending].tolist() if self.pending else []
        first, self.pending = self.first, 0
        for i, (bad, loss, grad_norm, weights_ok) in enumerate(rows):
            if bad:
                self.handle(first + i, loss, grad_norm, bool(weights_ok))
        if rows and rows[-1][0]:
            self.optimizer.zero_grad(set_to_none=True)  # the latest step's gradients were not used

    def check_weights(self, step: int) -> None:
        """Stop when the latest update made the weights non-finite: no policy can undo an update."""
        self.settle()
        if not bool(self.weights_ok):
            raise self.weights_error(step)

    def handle(self, step: int, loss: float, grad_norm: float, weights_ok: bool) -> None:
        """Step `step` was not taken (its update skipped on the device): count it, or stop."""
        if not weights_ok:  # the previous update's weights, before blaming this batch
            raise self.weights_error(step - 1)
        what = f"loss={loss:.4g}, grad_norm={grad_norm:.4g}"
        if self.policy == "skip":
            self.skipped += 1
            self.logger.scalars({"train/skipped_batches": self.skipped}, step)
            log.warning("step %d: non-finite %s; batch skipped (%d so far)", step, what, self.skipped)
            return
        raise self.error(f"non-finite values at step {step} ({what}); weights were not updated",
                         "Lower optimizer.lr, set trainer.grad_clip, use trainer.precision=fp32, or set "
                         "trainer.nonfinite=skip.")

    def weights_error(self, step: int) -> NonFiniteError:
        return self.error(f"the update at step {step} made the weights non-finite (its loss and gradient norm "
                          f"were finite); they were neither evaluated nor saved",
                          "Lower optimizer.lr or optimizer.weight_decay.")

    def error(self, what: str, advice: str) -> NonFiniteError:
        last = self.last_good()  # never non-finite: the trainer refuses to write one
        return NonFiniteError(f"{what}. Last good checkpoint: {last if last.exists() else 'none yet'}. {advice}")
