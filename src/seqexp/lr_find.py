"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's and Lightning's
`lr_find`): train a copy of the model for a few hundred steps while the learning rate rises
exponentially from `min_lr` to `max_lr`, and read a good learning rate off the loss curve.

Each step is the trainer's own (update.py: the task's loss, accumulation, clipping, precision),
on the run's data and optimizer, with the schedule replaced by the exponential ramp. The test
stops early once the loss diverges: non-finite, or the smoothed loss above `diverge` x its best.

Two readings of the curve, both printed:
- the steepest descent of the smoothed loss against log(lr): where the loss falls fastest
  (Lightning's suggestion);
- a tenth of the lr at the smoothed loss's minimum (fastai's older rule): the minimum is already
  on the edge of divergence, a tenth of it is usually safe.

Nothing is written and nothing is kept: the model given (if any) is deep-copied, the torch RNG
is restored afterwards, no run directory exists.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from seqexp.build import build_data, build_model, build_optimizer, pick_device
from seqexp.config import validate
from seqexp.distributed import Local
from seqexp.ema import NoAverage
from seqexp.errors import UserError
from seqexp.guard import NonFiniteGuard
from seqexp.logger import Logger
from seqexp.trainer import groups
from seqexp.update import Update

log = logging.getLogger("seqexp")

SKIP_BEGIN = 10  # the smoothed curve's first points lean on very few losses (Lightning skips 10)


@dataclass
class RangeTest:
    lrs: list[float]  # the lr of each step taken
    losses: list[float]  # each step's training loss (nan where it was not finite)
    smoothed: list[float]  # debiased exponential moving average of the losses
    min_lr: float
    max_lr: float
    diverged: bool  # stopped early: the loss diverged before max_lr

    @property
    def begin(self) -> int:
        """The first point read: SKIP_BEGIN in, when the curve is long enough for it."""
        return SKIP_BEGIN if len(self.lrs) >= 2 * SKIP_BEGIN else 0

    @property
    def lowest(self) -> int:
        """The index of the smoothed loss's minimum (from `begin` on: not a lucky first batch)."""
        return self.begin + int(np.nanargmin(self.smoothed[self.begin:]))

    @property
    def minimum(self) -> float:
        """The lr at the smoothed loss's minimum."""
        return self.lrs[self.lowest]

    @property
    def suggestion(self) -> float:
        """The lr where the smoothed loss falls fastest against log(lr), before its minimum; with
        too few points for a slope, a tenth of the minimum's lr."""
        begin, end = self.begin, self.lowest + 1
        if end - begin < 3:
            return max(self.minimum / 10, self.min_lr)
        slope = np.gradient(np.asarray(self.smoothed[begin:end]), np.log(self.lrs[begin:end]))
        return self.lrs[begin + int(np.nanargmin(slope))]

    def lines(self) -> list[str]:
        stop = (f"stopped at lr {self.lrs[-1]:.3g}: the loss diverged" if self.diverged
                else f"reached max_lr {self.max_lr:g}")
        start, low = self.smoothed[self.begin], self.smoothed[self.lowest]
        # a curve that barely fell (too few steps for the model to learn, too narrow a range) has
        # no real steepest descent: the numbers below are then noise
        return [f"lr range test: {len(self.lrs)} steps from {self.min_lr:g}; {stop}",
                f"smoothed loss: {start:.4g} at step {self.begin + 1}, lowest {low:.4g} "
                f"({(low - start) / abs(start):+.1%}) at lr {self.minimum:.3g}",
                f"suggested lr (steepest descent of the smoothed loss): {self.suggestion:.3g}",
                f"a tenth of the lr at the smoothed loss's minimum ({self.minimum:.3g}): {self.minimum / 10:.3g}"]


def ramp(min_lr: float, max_lr: float, steps: int) -> float:
    """The factor between consecutive steps' lr: min_lr at the first step, max_lr at the last."""
    return (max_lr / min_lr) ** (1.0 / max(steps - 1, 1))


def check(steps: int, min_lr: float, max_lr: float, diverge: float, beta: float) -> None:
    if steps < 2:
        raise UserError(f"--steps must be at least 2, got {steps}.")
    if not 0 < min_lr < max_lr < math.inf:
        raise UserError(f"need 0 < --min-lr < --max-lr (finite), got {min_lr:g} and {max_lr:g}.")
    if not diverge > 1:
        raise UserError(f"--diverge must be > 1 (a multiple of the best smoothed loss), got {diverge:g}.")
    if not 0 <= beta < 1:
        raise UserError(f"beta must be in [0, 1), got {beta:g}.")


def range_test(cfg: DictConfig, *, steps: int = 200, min_lr: float = 1e-6, max_lr: float = 1.0,
               diverge: float = 4.0, beta: float = 0.98, model: Optional[torch.nn.Module] = None,
               data=None) -> RangeTest:
    """Run the test on the config `scripts/train.py` would compose (its optimizer, data, model,
    trainer settings; its scheduler is replaced by the ramp). `model`, `data`: already built ones
    (the model is copied, never trained itself); else built as train.py builds them."""
    check(steps, min_lr, max_lr, diverge, beta)
    validate(cfg)
    t = cfg.trainer
    device = pick_device(str(t.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(t.seed)
        data = data if data is not None else build_data(cfg.data, seed=t.seed)
        if model is None:
            net = build_model(cfg.model, data.model_kwargs())
            net.prepare(lambda: data.batches("train", stateful=net.stateful, epoch=0))
        else:
            net = copy.deepcopy(model)  # the caller's model and its weights stay as they are
        net = net.to(device)
        return _run(cfg, net, data, device, steps=steps, min_lr=min_lr, max_lr=max_lr, diverge=diverge, beta=beta)


def _run(cfg, net, data, device, *, steps, min_lr, max_lr, diverge, beta) -> RangeTest:
    t = cfg.trainer
    optimizer = build_optimizer(cfg.optimizer, net)
    for g in optimizer.param_groups:
        g["lr"] = min_lr
    # torch's own exponential schedule: lr x gamma after every step, as update.py steps it
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ramp(min_lr, max_lr, steps))
    params = [p for p in net.parameters() if p.requires_grad]
    # skip: a non-finite step is not applied; the loop below sees the loss and stops
    guard = NonFiniteGuard("skip", log_every=1, params=params, device=device, optimizer=optimizer,
                           logger=Logger(), last_good=lambda: Path("(none)"))
    update = Update(t, model=net, optimizer=optimizer, scheduler=scheduler, task=data.task,
                    dist=Local(device=device), guard=guard, average=NoAverage(), device=device)
    lrs, losses, smoothed = [], [], []
    avg, best, diverged, epoch, carried = 0.0, math.inf, False, 0, None
    while len(lrs) < steps and not diverged:
        taken = len(lrs)
        for micro in groups(data.batches("train", stateful=net.stateful, epoch=epoch), t.accumulate):
            lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step trains with
            carried, loss, _, ok = update(micro, carried, len(lrs))
            value = float(loss)  # one read per step: the test decides after every step
            # not ok: the loss, the gradient or the weights were not finite (the update was skipped)
            if not (math.isfinite(value) and bool(ok)):
                losses.append(math.nan)
                smoothed.append(math.nan)
                diverged = True
                break
            avg = beta * avg + (1 - beta) * value
            s = avg / (1 - beta ** (len(losses) + 1))  # debiased: the early average is not pulled to 0
            losses.append(value)
            smoothed.append(s)
            best = min(best, s)
            if s > diverge * best:
                diverged = True
                break
            if len(lrs) == steps:
                break
        else:  # the epoch ended: the next starts with a fresh state, as in training
            epoch, carried = epoch + 1, None
            if len(lrs) == taken:
                raise UserError("the training split has no full step of batches; lower data.batch_size "
                                "or trainer.accumulate.")
    if not any(math.isfinite(s) for s in smoothed):
        raise UserError(f"the loss was not finite even at lr {min_lr:g}; lower --min-lr.")
    return RangeTest(lrs, losses, smoothed, min_lr=min_lr, max_lr=max_lr, diverged=diverged)


def plot(result: RangeTest, path: str | Path) -> Path:
    """The loss against the lr (log scale), with both suggestions marked, as an image file."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"steepest descent {result.suggestion:.2g}")
    ax.axvline(result.minimum / 10, color="C2", ls=":", label=f"minimum / 10 {result.minimum / 10:.2g}")
    finite = [v for v in result.losses + result.smoothed if math.isfinite(v)]
    # the diverging end would flatten the rest of the curve: clip the y axis above the start
    low, high = min(finite), max(result.smoothed[0], min(finite)) * 1.25 + 1e-9
    ax.set_ylim(low - 0.05 * (high - low), high)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path
