"""The one training loop, shared by every task and model.

Periodic work is `if step % every == 0`, not callbacks. The hot loop reads nothing back from
the device except the finiteness check before `optimizer.step()`; losses and gradient norms
are summed on the device and read once per `log_every` steps.

Everything that decides what happens next -- step, epoch, position within the epoch, the
carried RNN state, optimizer/scheduler/scaler state, every RNG, the open logging window -- is
in `state_dict()`, so N steps + resume + N steps equals 2N steps exactly. A stop request
(SIGTERM/SIGINT, see preempt.py) is honoured between steps, after saving `last.pt`.

Under DDP (`dist`, see distributed.py) every rank runs this loop on its rows of each batch;
decisions are all-reduced, evaluation sums are added over ranks, and only rank 0 writes.
Checkpoints hold the global carried state and each rank's RNG and logging window.

With `trainer.ema` > 0 the trainer keeps an exponential moving average of the weights. The
average is what is evaluated, chosen as best and saved as a checkpoint's "model", so every tool
that loads a checkpoint (test evaluation, predict, ensemble) uses the weights that were
validated; the weights the optimizer steps are in the trainer state ("weights"), for resume.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from seqexp.checkpoint import (FORMAT, load_model_state, prune_step_checkpoints, rng_state, save_checkpoint,
                               set_rng_state, step_name, write_json)
from seqexp.distributed import Dist
from seqexp.errors import UserError
from seqexp.preempt import Preempted
from seqexp.tasks import detach_state, to_device

log = logging.getLogger("seqexp")


class NonFiniteError(UserError):
    exit_code = 3


class Trainer:
    def __init__(self, cfg, *, model, task, data, optimizer, scheduler, logger, run_dir: Path,
                 device: torch.device, total_steps: int, meta: dict,
                 sampler: Optional[Callable[[torch.nn.Module, int], str]] = None,
                 visuals: Optional[Callable[[torch.nn.Module, int, dict], None]] = None,
                 dist: Optional[Dist] = None):
        self.cfg, self.model, self.task, self.data = cfg, model, task, data
        self.optimizer, self.scheduler, self.logger = optimizer, scheduler, logger
        self.run_dir, self.device, self.total_steps = Path(run_dir), device, total_steps
        self.meta, self.sampler = meta, sampler  # meta: config, runtime facts, vocabulary
        self.visuals = visuals  # TensorBoard figures and texts after each evaluation (seqexp.visuals)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist, self.is_main = dist, dist is None or dist.is_main  # only the main process writes
        # compiled (and under DDP wrapped) forward for training; checkpoints and evaluation use the plain module
        net = dist.wrap(model) if dist is not None else model
        self.net = torch.compile(net) if cfg.compile else net
        self.stateful = model.stateful
        self.steps_per_epoch = data.num_batches("train", stateful=self.stateful)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights once
        self.param_names, self.params = [n for n, _ in named], [p for _, p in named]
        self.num_params = sum(p.numel() for p in self.params)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(cfg.precision))
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        # fp16 needs loss scaling; its own inf checks skip overflowing steps
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

        self.step = self.epoch = self.batch_in_epoch = 0
        self.carried = None  # RNN state at the end of the last chunk
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_metrics: dict = {}
        self.last_metrics: dict = {}
        self.skipped = 0  # batches dropped by nonfinite=skip
        self.elapsed = 0.0  # seconds in fit() before this process
        self.eval_s = 0.0  # of which evaluating and checkpointing (not training)
        self.extra_metrics: dict = {}  # e.g. test metrics, added by train()
        self._window = torch.zeros(3, device=device)  # running sums: loss, grad norm, steps
        self.stop_signal: Optional[str] = None  # set by a signal handler; honoured between steps
        self.resumed_from: Optional[Path] = None  # never pruned by keep_last
        # the moving average of self.params (trainer.ema > 0), and how many updates it has had
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema > 0 else None
        self.ema_updates = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "carried": self.carried,
            "best": self.best, "best_step": self.best_step, "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics, "skipped": self.skipped,
            "elapsed": self.wall_s(), "eval_s": self.eval_s, "ema_updates": self.ema_updates,
            "window": self._window.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            **(self.dist_state() if self.dist is not None else {}),
        }

    def dist_state(self) -> dict:
        """Under DDP (a collective: every rank calls it): the global carried state, and what each rank
        keeps for itself -- its RNG (dropout masks differ by rank) and its logging window."""
        ranks = self.dist.gather({"rng": rng_state(), "window": self._window.cpu()})
        return {"carried": self.dist.gather_state(self.carried), "ranks": ranks}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("step", "epoch", "batch_in_epoch", "best", "best_step", "best_metrics",
                    "last_metrics", "skipped", "elapsed", "eval_s"):
            setattr(self, key, sd[key])
        carried = sd["carried"]
        if isinstance(carried, (tuple, list)):
            carried = tuple(t.to(self.device) for t in carried)
        self.carried = carried.to(self.device) if torch.is_tensor(carried) else carried
        self.ema_updates = sd.get("ema_updates", 0)
        self._window = sd["window"].to(self.device)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        set_rng_state(sd["rng"])
        if self.dist is not None:
            self.load_dist_state(sd)

    def load_dist_state(self, sd: dict) -> None:
        """The saved global carried state, split for this rank's streams; its own RNG and window when
        the checkpoint had as many processes (exact resume), otherwise fresh per-rank RNG streams."""
        self.carried = self.dist.shard_state(self.carried)
        ranks = sd.get("ranks", [])
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank]["rng"])
            self._window = ranks[self.dist.rank]["window"].to(self.device)
        elif self.dist.rank > 0:
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.dist.rank + self.step)

    def restore(self, ckpt: dict, path: Path) -> None:
        """Continue from a checkpoint: weights, then everything in state_dict()."""
        averaged = "weights" in ckpt["trainer"]  # saved with EMA on: "model" is the average
        load_model_state(self.model, ckpt["trainer"]["weights"] if averaged else ckpt["model"], path)
        self.load_state_dict(ckpt["trainer"])
        if self.ema is not None:
            if averaged:
                with torch.no_grad():
                    for name, e in zip(self.param_names, self.ema):
                        e.copy_(ckpt["model"][name])
            else:  # EMA turned on at this resume: it starts from the current weights
                self.ema = [p.detach().clone() for p in self.params]
                self.ema_updates = 0
        self.resumed_from = Path(path)

    def checkpoint(self) -> dict:
        trainer = self.state_dict()
        if self.ema is None:
            return {"format": FORMAT, **self.meta, "model": self.model.state_dict(), "trainer": trainer}
        return {"format": FORMAT, **self.meta, "model": self.averaged_state(),
                "trainer": {**trainer, "weights": self.model.state_dict()}}

    # ------------------------------------------------------------------ weight averaging
    def update_ema(self) -> None:
        """ema += (1 - decay) * (weights - ema). The decay ramps up as (1 + n) / (10 + n) to
        trainer.ema (TensorFlow's ExponentialMovingAverage with num_updates), so early averages do
        not cling to the initial weights."""
        self.ema_updates += 1
        decay = min(self.cfg.ema, (1 + self.ema_updates) / (10 + self.ema_updates))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p, 1.0 - decay)

    def averaged_state(self) -> dict:
        """model.state_dict() with the averaged weights in place of the trained ones."""
        # by storage, so that a tied weight's two names both get the average
        ema = {p.data_ptr(): e for p, e in zip(self.params, self.ema)}
        return {k: ema.get(v.data_ptr(), v).clone() for k, v in self.model.state_dict().items()}

    @contextmanager
    def averaged(self):
        """Inside the block the model holds the averaged weights (with EMA off: its own)."""
        if self.ema is None:
            yield
            return
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def save(self, *names: str) -> Path:
        ckpt = self.checkpoint()  # under DDP every rank takes part; rank 0 writes
        if self.is_main:
            save_checkpoint([self.ckpt_dir / n for n in names], ckpt)
        return self.ckpt_dir / names[0]

    def save_last(self) -> Path:
        """last.pt; every checkpoint_every steps also step_XXXXXX.pt, the newest keep_last kept."""
        keep = self.cfg.keep_last
        if keep == 0 or self.step % self.cfg.checkpoint_every != 0:
            return self.save("last.pt")
        path = self.save("last.pt", step_name(self.step))
        if not self.is_main:
            return path
        protect = frozenset([self.resumed_from] if self.resumed_from else [])
        prune_step_checkpoints(self.ckpt_dir, keep, upto=self.step, protect=protect)
        return path

    def request_stop(self, reason: str) -> None:
        self.stop_signal = reason
        log.warning("%s received: stopping after this step (send it again to stop at once)", reason)

    def agree(self, flag: bool) -> bool:
        """Under DDP: true on every rank when true on any, so all take the same branch."""
        return flag if self.dist is None else self.dist.any(flag)

    def stop(self) -> None:
        path = self.save_last()
        self.write_metrics("preempted")
        raise Preempted(f"{self.stop_signal or 'a signal to another rank'} after step {self.step}; saved {path}. "
                        f"Continue with: python scripts/train.py resume={self.run_dir}")

    # ------------------------------------------------------------------ loop
    def wall_s(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    def train_s(self) -> float:
        """Time spent training: wall time less evaluation and checkpoint writing."""
        return self.wall_s() - self.eval_s

    def fit(self) -> dict:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        t_window, tokens_window = time.perf_counter(), 0
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True, unit="step", desc="train")
        try:
            while self.step < self.total_steps:
                batches = self.data.batches("train", stateful=self.stateful, epoch=self.epoch,
                                            start=self.batch_in_epoch)
                for batch in batches:
                    tokens_window += batch["num_tokens"] * (self.dist.world_size if self.dist else 1)
                    self.train_step(batch)
                    self.batch_in_epoch += 1
                    self.step += 1
                    if self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        self.log_window(bar, tokens_window / max(now - t_window, 1e-9))
                        t_window, tokens_window = now, 0
                    if cfg.max_time_s and self.agree(self.train_s() >= cfg.max_time_s):
                        log.info("training-time budget of %.0f s reached at step %d", cfg.max_time_s, self.step)
                        self.total_steps = self.step  # this is the last step: evaluate and save below
                    if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                        self.evaluate_and_save()
                    elif self.step % cfg.checkpoint_every == 0:
                        self.save_last()
                    if self.agree(self.stop_signal is not None) and self.step < self.total_steps:
                        self.stop()  # (at the last step the run simply finishes)
                    if self.step >= self.total_steps:
                        break
                else:  # epoch exhausted: next epoch starts with a fresh state
                    self.epoch, self.batch_in_epoch, self.carried = self.epoch + 1, 0, None
            if not self.last_metrics:  # resumed a finished run: evaluate once for the summary
                self.evaluate_and_save()
        finally:
            bar.close()
            self.logger.flush()
        return self.summary()

    def train_step(self, batch: dict) -> None:
        self.net.train()
        batch = to_device(batch, self.device)
        state = detach_state(self.carried) if batch["carry"] else None  # truncate BPTT here
        with self.autocast():
            logits, new_state = self.net(batch["tokens"], batch.get("lengths"), state)
        loss = self.task.loss(logits, batch)
        if "loss_scale" in batch:  # DDP: this rank's share of the global batch (data/shard.py)
            loss = loss * batch["loss_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # caught before the update, so neither weights nor checkpoints ever see a NaN
        ok = torch.isfinite(loss) if self.scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.dist is not None:
            ok = self.dist.all(ok)  # a NaN loss on one rank stops or skips the step on all
        if not bool(ok):
            self.handle_nonfinite(loss, grad_norm)
            self.scheduler.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.update_ema()
        self.carried = detach_state(new_state) if self.stateful else None
        self._window += torch.stack([loss.detach().float(), grad_norm.detach().float(),
                                     torch.ones((), device=self.device)])

    def handle_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        step = self.step + 1
        what = f"loss={loss.item():.4g}, grad_norm={grad_norm.item():.4g}"
        self.optimizer.zero_grad(set_to_none=True)
        self.carried = None  # a state that produced NaN is no start for the next chunk
        if str(self.cfg.nonfinite) == "skip":
            self.skipped += 1
            self.logger.scalars({"train/skipped_batches": self.skipped}, step)
            log.warning("step %d: non-finite %s; batch skipped (%d so far)", step, what, self.skipped)
            return
        last = self.ckpt_dir / "last.pt"
        raise NonFiniteError(
            f"non-finite values at step {step} ({what}); weights were not updated. Last good checkpoint: "
            f"{last if last.exists() else 'none yet'}. Lower optimizer.lr, set trainer.grad_clip, use "
            f"trainer.precision=fp32, or set trainer.nonfinite=skip.")

    def log_window(self, bar, tokens_per_s: float) -> None:
        # the one device read per window; under DDP the mean over ranks (the global batch's loss)
        window = self._window if self.dist is None else self.dist.mean(self._window)
        loss_sum, gnorm_sum, n = window.tolist()
        self._window.zero_()
        lr = self.optimizer.param_groups[0]["lr"]
        if n > 0:
            self.logger.scalars({"train/loss": loss_sum / n, "train/grad_norm": gnorm_sum / n}, self.step)
            bar.set_postfix_str(f"loss {loss_sum / n:.3f}  lr {lr:.2e}  {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
        self.logger.scalars({"train/lr": lr, "train/tokens_per_s": tokens_per_s}, self.step)
        bar.update(self.step - bar.n)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "val") -> dict:
        batches = self.data.batches(split, stateful=self.stateful)
        sums = self.task.sums(self.model, batches, self.device, self.autocast)
        return self.task.metrics(sums if self.dist is None else self.dist.sum(sums))

    def evaluate_and_save(self) -> None:
        t0 = time.perf_counter()
        self.logger.scalars({"time/train_s": self.train_s()}, self.step)
        with self.averaged():  # what is validated is what is saved as the checkpoint's "model"
            metrics = self.evaluate("val")
            if self.sampler is not None:
                self.logger.text("samples", self.sampler(self.model, self.step), self.step)
            if self.visuals is not None:
                self.visuals(self.model, self.step, metrics)
        self.last_metrics = {f"val/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        self.logger.scalars(self.last_metrics, self.step)
        if "confusion" in metrics:  # classification
            self.logger.confusion("val/confusion", metrics["confusion"], self.step, getattr(self.data, "classes", None))
        value = self.last_metrics[self.task.objective]
        better = self.best is None or (value < self.best if self.task.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step, self.best_metrics = value, self.step, dict(self.last_metrics)
        log.info("step %d: %s%s", self.step,
                 "  ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float)),
                 "  (best)" if better else "")
        if better:
            self.save("best.pt")
        self.save_last()
        self.write_metrics("running")
        self.logger.flush()
        self.eval_s += time.perf_counter() - t0

    def summary(self, status: str = "finished") -> dict:
        return {
            "status": status,
            "task": self.task.name,
            "objective": {"metric": self.task.objective, "mode": self.task.mode, "best": self.best},
            "final": self.last_metrics,
            "best": self.best_metrics,
            "best_step": self.best_step,
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "skipped_batches": self.skipped,
            "num_params": self.num_params,
            **self.extra_metrics,
            # the only entries that differ between two runs of the same config
            "timing": {"wall_time_s": round(self.wall_s(), 3), "train_time_s": round(self.train_s(), 3)},
        }

    def write_metrics(self, status: str) -> None:
        if self.is_main:
            write_json(self.run_dir / "metrics.json", self.summary(status))
