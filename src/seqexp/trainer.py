"""The one training loop, shared by every task and model.

Periodic work is `if step % every == 0`, not callbacks. The loop reads nothing back from the
device per step: losses, gradient norms and the non-finite verdicts (guard.py) stay on the
device and are read once per `log_every` steps, and before an evaluation or a save.

Everything that decides what happens next -- step, epoch, position within the epoch, the
carried RNN state, optimizer/scheduler/scaler state, every RNG, the open logging window -- is
in `state_dict()`, so N steps + resume + N steps equals 2N steps exactly. A stop request
(SIGTERM/SIGINT, see preempt.py) is honoured between steps, after saving the last checkpoint.

What one step does is update.py's; what is shown around evaluations is the reports' (reports/);
what the run's record says is record.py's; where files go is the run directory's (rundir.py). Under
DDP (distributed.py) every rank runs this loop on its rows of each batch; decisions are
all-reduced, evaluation sums added over ranks, and only rank 0 writes. In a single process the
same calls are identities.

With `trainer.ema` > 0 the average of the weights (ema.py) is what is evaluated, chosen as best
and saved as a checkpoint's "model", so every tool that loads a checkpoint uses the weights
that were validated; the checkpoint keeps the trained weights for resume.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from seqexp import checkpoint
from seqexp.checkpoint import (Checkpoint, TrainerState, assemble, ema_state, for_use, load_model_state, nonfinite,
                               rng_state, set_rng_state, trained_weights, write)
from seqexp.ema import averaging
from seqexp.errors import UserError
from seqexp.evaluation import tracked
from seqexp.guard import NonFiniteGuard
from seqexp.monitor import Monitor, metric_and_mode
from seqexp.plan import Estimate
from seqexp.preempt import Preempted
from seqexp.profile import profiling
from seqexp.record import Progress, RunRecord
from seqexp.reports.base import Context, Reports
from seqexp.rundir import RunDir
from seqexp.update import Update

log = logging.getLogger("seqexp")


class Trainer:
    def __init__(self, cfg, *, model, data, optimizer, scheduler, logger, reports, run_dir: RunDir,
                 device: torch.device, total_steps: int, recipe: dict, dist, quiet: bool = False,
                 metric_modes: Optional[dict] = None):
        # data: the whole dataset; its task decides the loss and the metrics (tasks/)
        self.cfg, self.model, self.data, self.task = cfg, model, data, data.task
        self.optimizer, self.scheduler, self.logger = optimizer, scheduler, logger
        self.run_dir, self.device, self.total_steps = run_dir, device, total_steps
        self.recipe = recipe  # what rebuilds the run from a checkpoint alone: config, runtime facts, data state
        self.dist, self.is_main = dist, dist.is_main  # only the main process writes
        self.shard = dist.shard(data)  # what this process iterates: under DDP its rows of every batch
        if device.type == "cuda":  # TF32 tensor-core matmuls and convolutions (trainer.tf32); a CPU has none
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
        self.stateful, self.accumulate = model.stateful, cfg.accumulate
        # optimizer steps; an epoch's last batches that do not fill a step are left out
        self.steps_per_epoch = data.num_batches("train", stateful=self.stateful) // self.accumulate
        params = [p for p in model.parameters() if p.requires_grad]  # tied weights once
        self.num_params = sum(p.numel() for p in params)
        self.average = averaging(model, cfg.ema)  # the weight average, or none (trainer.ema = 0)
        self.guard = NonFiniteGuard(str(cfg.nonfinite), log_every=cfg.log_every, params=params, device=device,
                                    optimizer=optimizer, logger=logger, last_good=lambda: self.run_dir.last)
        self.update = Update(cfg, model=model, optimizer=optimizer, scheduler=scheduler, task=self.task, dist=dist,
                             guard=self.guard, average=self.average, device=device)
        # trainer.profile: a few steps under torch.profiler (main process only), else a no-op
        self.profiler = profiling(bool(cfg.profile) and self.is_main, run_dir.profile, device)
        self.p = Progress()
        self.carried = None  # RNN state at the end of the last chunk
        # the monitored validation metric (trainer.monitor, mode) and early stopping (patience);
        # metric_modes: the names the data logs (Dataset.metric_modes), else the task's own
        self.monitor = Monitor(*metric_and_mode(cfg, self.task, metric_modes), cfg.patience, cfg.min_delta)
        self.record = RunRecord(run_dir, is_main=self.is_main, task=self.task.name, num_params=self.num_params,
                                steps_per_epoch=self.steps_per_epoch, monitor=self.monitor, target=cfg.target)
        self.log_sums = torch.zeros(3, device=device)  # loss, grad norm, steps since the last log line
        self.stop_signal: Optional[str] = None  # set by a signal handler; honoured between steps
        self.resumed_from: Optional[Path] = None  # never pruned by keep_last
        self.forward_s: dict[str, float] = {}  # split -> seconds of its latest evaluation pass (estimates)
        self.training_over = False  # fit() has returned: what follows (the test split) may be abandoned
        self.reports = Reports(reports, Context(
            model=model, data=data, logger=logger, device=device, seed=cfg.seed, is_main=self.is_main, quiet=quiet,
            evaluate=self.evaluate, report=self.report, best_weights=self.best_weights))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> TrainerState:
        p = self.p
        return {
            "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "carried": self.carried,
            "best": p.best, "best_step": p.best_step, "best_metrics": p.best_metrics,
            "last_metrics": p.last_metrics, "skipped": self.guard.skipped,
            "elapsed": self.wall_s(), "eval_s": p.eval_s, "ema_updates": self.average.updates,
            "window": self.log_sums.cpu(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.update.scaler.state_dict(), "rng": rng_state(),
            "monitor": self.monitor.state_dict(), "stopped_early": p.stopped_early,
            "target": self.cfg.target, "target_step": p.target_step, "target_train_s": p.target_train_s,
            # under DDP (a collective): the global carried state, each rank's RNG and window
            **self.dist.gather_trainer_state(self.carried, self.log_sums, self.model.state_batch_dim),
        }

    def load_state_dict(self, sd: TrainerState) -> None:
        for key in ("step", "epoch", "batch_in_epoch", "best", "best_step", "best_metrics", "last_metrics",
                    "elapsed", "eval_s"):
            setattr(self.p, key, sd[key])
        self.p.stopped_early = sd.get("stopped_early")  # (checkpoints from before it: none)
        if sd.get("target") == self.cfg.target:  # a resume with another target starts its count afresh
            self.p.target_step, self.p.target_train_s = sd.get("target_step"), sd.get("target_train_s")
        self.guard.skipped = sd["skipped"]
        carried = sd["carried"]
        if isinstance(carried, (tuple, list)):
            carried = tuple(t.to(self.device) for t in carried)
        self.carried = carried.to(self.device) if torch.is_tensor(carried) else carried
        self.log_sums = sd["window"].to(self.device)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.update.scaler.load_state_dict(sd["scaler"])
        set_rng_state(sd["rng"])
        if "monitor" in sd:  # (checkpoints from before early stopping: no countdown yet)
            self.monitor.load_state_dict(sd["monitor"])
        self.carried, self.log_sums = self.dist.shard_trainer_state(
            sd, self.carried, self.log_sums, seed=self.cfg.seed, step=self.p.step, batch_dim=self.model.state_batch_dim)

    def restore(self, ckpt: Checkpoint, path: Path) -> None:
        """Continue from a checkpoint: the trained weights, everything in state_dict(), the average
        (restarted from the weights if trainer.ema is turned on at this resume)."""
        load_model_state(self.model, trained_weights(ckpt), path)
        self.load_state_dict(ckpt["trainer"])
        self.average.restart(ema_state(ckpt))
        self.resumed_from = Path(path)

    def save(self, best: bool = False) -> Path:
        """The last checkpoint -- every checkpoint_every steps a step checkpoint too, the newest
        keep_last kept -- and, with `best`, the best one (what evaluation and sampling need)."""
        self.guard.settle()  # a pending non-finite step: nonfinite=stop stops before anything is written
        step = self.p.step
        ckpt = assemble(self.recipe, self.model, self.state_dict(), self.average.averaged_state())  # DDP: all ranks
        # the same answer on every rank (weights and optimizer state agree), so all stop together
        if bad := nonfinite(ckpt):
            raise self.guard.error(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                   f"at step {step}; not saved", "Lower optimizer.lr or set trainer.grad_clip.")
        keep, periodic = self.cfg.keep_last, step % self.cfg.checkpoint_every == 0
        if self.is_main:
            if best:
                write(self.run_dir.best, for_use(ckpt))
            write([self.run_dir.last] + ([self.run_dir.step_checkpoint(step)] if keep and periodic else []), ckpt)
            if keep and periodic:
                self.run_dir.prune(keep, upto=step, protect=frozenset(filter(None, [self.resumed_from])))
        return self.run_dir.last

    def best_weights(self) -> dict:
        self.dist.barrier()  # every rank reads the best checkpoint only once the main process wrote it
        return checkpoint.read(self.run_dir.best)["model"]

    # ------------------------------------------------------------------ stopping
    def request_stop(self, reason: str) -> None:
        self.stop_signal = reason
        log.warning("%s received: %s (send it again to stop at once)", reason,
                    "abandoning the evaluation" if self.training_over else "stopping after this step")

    def stop(self) -> None:
        path = self.save()
        self.write_record("preempted")
        raise Preempted(f"{self.stop_signal or 'a signal to another rank'} after step {self.p.step}; saved {path}. "
                        f"Continue with: python scripts/train.py resume={self.run_dir}")

    def abandon_if_stopped(self) -> None:
        """After training (between batches of the test split): a stop signal ends the run as
        preempted. Training is complete in the last checkpoint, so `resume=` goes straight to
        the evaluation."""
        if not self.dist.any(self.stop_signal is not None):
            return
        self.write_record("preempted")
        raise Preempted(f"{self.stop_signal or 'a signal to another rank'} during the evaluation after training "
                        f"(step {self.p.step}); training is saved in {self.run_dir.last}. "
                        f"Continue with: python scripts/train.py resume={self.run_dir}")

    @property
    def done(self) -> bool:
        """The last step is taken, patience ran out or the target is reached (decisions saved with
        the checkpoint: a resume from there is done too)."""
        p = self.p
        return p.step >= self.total_steps or p.stopped_early is not None or p.target_step is not None

    # ------------------------------------------------------------------ the loop
    def wall_s(self) -> float:
        return self.p.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    def train_s(self) -> float:
        """Time spent training: wall time less evaluation and checkpoint writing."""
        return self.wall_s() - self.p.eval_s

    def fit(self) -> dict:
        cfg, p = self.cfg, self.p
        self._t0 = time.perf_counter()
        t_window, tokens_window = time.perf_counter(), 0
        after = self.reports.splits_after_training()  # e.g. the test split on the best weights
        self.estimate = Estimate(start=p.step, total=self.total_steps, eval_every=cfg.eval_every,
                                 max_time_s=cfg.max_time_s, train_s=self.train_s(), show=self.is_main,
                                 test_batches=sum(self.data.num_batches(s, stateful=self.stateful) for s in after))
        bar = tqdm(total=self.total_steps, initial=p.step, disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True, unit="step", desc="train")
        try:
            while not self.done:
                batches = self.shard.batches("train", stateful=self.stateful, epoch=p.epoch, start=p.batch_in_epoch)
                for micro in groups(batches, self.accumulate):
                    tokens_window += sum(b["num_tokens"] for b in micro) * self.dist.world_size
                    self.carried, loss, grad_norm, ok = self.update(micro, self.carried, p.step + 1)
                    self.profiler.step()
                    self.log_sums += torch.where(ok, torch.stack([loss.float(), grad_norm.float(), ok.float()]), 0.0)
                    p.batch_in_epoch += len(micro)
                    p.step += 1
                    if p.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        self.log_window(bar, tokens_window / max(now - t_window, 1e-9))
                        t_window, tokens_window = now, 0
                        self.estimate.window(p.step, self.train_s())  # the first window only
                    if cfg.max_time_s and self.dist.any(self.train_s() >= cfg.max_time_s):
                        log.info("training-time budget of %.0f s reached at step %d", cfg.max_time_s, p.step)
                        self.total_steps = p.step  # this is the last step: evaluate and save below
                    if p.step % cfg.eval_every == 0 or p.step == self.total_steps:
                        self.evaluate_and_save()
                    elif p.step % cfg.checkpoint_every == 0:
                        self.save()
                    if self.dist.any(self.stop_signal is not None) and not self.done:
                        self.stop()  # (at the last step the run simply finishes)
                    if self.done:
                        break
                else:  # epoch exhausted: next epoch starts with a fresh state
                    p.epoch, p.batch_in_epoch, self.carried = p.epoch + 1, 0, None
            if not p.last_metrics:  # resumed a finished run: evaluate once for the summary
                self.evaluate_and_save()
            self.training_over = True
        finally:
            self.profiler.close()
            bar.close()
            self.logger.flush()
        return self.summary()

    def finish(self) -> dict:
        """After training: every report's closing work (the test split on the best checkpoint, a
        last sample) with the validated weights, then the record says "finished"."""
        with self.average.swapped():
            self.record.extra.update(self.reports.after_training(self.p.step, self.p.best_step))
        self.write_record("finished")
        return self.summary()

    def log_window(self, bar, tokens_per_s: float) -> None:
        # the one device read per window (under DDP the mean over ranks: the global batch's loss),
        # with the non-finite guard's rows since the last read
        values = torch.cat([self.dist.mean(self.log_sums), self.guard.unread()]).tolist()
        loss_sum, gnorm_sum, n = values[:3]
        self.guard.settle([values[i:i + 4] for i in range(3, len(values), 4)])
        self.log_sums.zero_()
        lr = self.optimizer.param_groups[0]["lr"]
        if n > 0:
            self.logger.scalars({"train/loss": loss_sum / n, "train/grad_norm": gnorm_sum / n}, self.p.step)
            bar.set_postfix_str(f"loss {loss_sum / n:.3f}  lr {lr:.2e}  {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
        self.logger.scalars({"train/lr": lr, "train/tokens_per_s": tokens_per_s}, self.p.step)
        bar.update(self.p.step - bar.n)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "val") -> dict:
        """One split's metrics, over all of it (under DDP: every rank's rows, summed)."""
        t0 = time.perf_counter()
        # a validation runs to its end before a stop (its result goes into the checkpoint); after
        # training a stop abandons the evaluation, which resuming runs again
        batches = tracked(self.shard.batches(split, stateful=self.stateful),
                          total=self.shard.num_batches(split, stateful=self.stateful), desc=split,
                          show=self.cfg.progress and self.is_main,
                          stop=self.abandon_if_stopped if self.training_over else None)
        sums = self.task.sums(self.model, batches, self.device, self.update.autocast)
        self.forward_s[split] = time.perf_counter() - t0
        return self.task.metrics(self.dist.sum(sums))

    def report(self, split: str, step: int) -> dict:
        """`split` evaluated with every report's additions, as the run records an evaluation."""
        return self.reports.after_evaluation(split, self.evaluate(split), step)

    def evaluate_and_save(self) -> None:
        t0, p = time.perf_counter(), self.p
        # the training time up to this evaluation: read before it, since its own time is added to
        # the evaluation total (p.eval_s) only when it ends
        trained = self.train_s()
        self.guard.check_weights(p.step)
        self.logger.scalars({"time/train_s": trained}, p.step)
        with self.average.swapped():  # what is validated is what is saved as the checkpoint's "model"
            metrics = self.report("val", p.step)
        p.last_metrics = {f"val/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        self.logger.scalars(p.last_metrics, p.step)
        if self.monitor.metric not in p.last_metrics:
            raise UserError(f"trainer.monitor={self.monitor.metric} was not evaluated (its report is switched off?); "
                            f"evaluated: {', '.join(p.last_metrics)}.")
        value = p.last_metrics[self.monitor.metric]
        better = self.monitor.better(value, p.best)  # strictly better (a NaN never is)
        if better:
            p.best, p.best_step, p.best_metrics = value, p.step, dict(p.last_metrics)
        self.monitor.update(value)
        if p.target_step is None and self.monitor.reaches(value, self.cfg.target):
            p.target_step, p.target_train_s = p.step, trained  # decided before saving, as below
            log.info("target reached at step %d: %s %.4f (trainer.target=%g), after %.1f s of training", p.step,
                     self.monitor.metric, value, self.cfg.target, p.target_train_s)
        if self.monitor.exhausted and p.step < self.total_steps and p.stopped_early is None:
            p.stopped_early = p.step  # decided before saving: a resume from here stops too
            log.info("early stop at step %d: %s has not improved by more than %g for %d evaluations (best %.4f "
                     "at step %s)", p.step, self.monitor.metric, self.monitor.min_delta, self.monitor.wait,
                     p.best if p.best is not None else math.nan, p.best_step)
        log.info("step %d: %s%s", p.step,
                 "  ".join(f"{k} {v:.4f}" for k, v in p.last_metrics.items() if isinstance(v, float)),
                 "  (best)" if better else "")
        self.save(best=better)
        self.write_record("running")
        self.logger.flush()
        p.eval_s += time.perf_counter() - t0
        self.estimate.evaluated(p.step, time.perf_counter() - t0, self.forward_s["val"],
                                self.data.num_batches("val", stateful=self.stateful))  # the first one only

    # ------------------------------------------------------------------ the record
    def summary(self, status: str = "finished") -> dict:
        return self.record.summary(status, self.p, skipped=self.guard.skipped, wall_s=self.wall_s(),
                                   train_s=self.train_s())

    def write_record(self, status: str) -> None:
        self.record.write(self.summary(status))


def groups(batches, k: int):
    """Consecutive lists of k batches; a last list shorter than k is dropped (not a full step)."""
    it = iter(batches)
    while len(group := list(itertools.islice(it, k))) == k:
        yield group
