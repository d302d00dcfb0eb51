"""The one training loop, shared by every task and model.

Periodic work is `if step % every == 0`, not callbacks. The hot loop reads nothing back from
the device: losses, gradient norms and the non-finite verdicts are kept on the device and read
once per `log_every` steps (and before an evaluation or a save). Exception: an optimizer that
cannot skip an update on a device flag (not fused, e.g. RMSprop) has each step read its verdict.

Everything that decides what happens next -- step, epoch, position within the epoch, the
carried RNN state, optimizer/scheduler/scaler state, every RNG, the open logging window -- is
in `state_dict()`, so N steps + resume + N steps equals 2N steps exactly. A stop request
(SIGTERM/SIGINT, see preempt.py) is honoured between steps, after saving `last.pt`.

Under DDP (`dist`, see distributed.py) every rank runs this loop on its rows of each batch;
decisions are all-reduced, evaluation sums are added over ranks, and only rank 0 writes.
Checkpoints hold the global carried state and each rank's RNG and logging window.

Gradient accumulation (`trainer.accumulate` = K): one optimizer step takes K consecutive
batches of the data ("micro-batches"); each micro-batch's mean loss is weighted by its share of
the K micro-batches' loss terms (task.loss_terms: targets for language models, examples for
classifiers), so the step's loss is the mean over all K together and K micro-batches of B rows
update the weights as one batch of K x B rows would. Stateful BPTT: micro-batch k of step s is
chunk s x K + k of every stream, its state carried (detached) from micro-batch k - 1. Everything
periodic counts optimizer steps; `batch_in_epoch` counts micro-batches, and a checkpoint is only
ever written between optimizer steps (no gradient half-accumulated), so resume is exact. Under
DDP the gradients are all-reduced once per step: the first K - 1 backward passes run under
`no_sync`.

With `trainer.ema` > 0 the trainer keeps an exponential moving average of the weights (ema.py).
The average is what is evaluated, chosen as best and saved as a checkpoint's "model", so every
tool that loads a checkpoint (test evaluation, predict, ensemble) uses the weights that were
validated; the checkpoint says so ("averaged") and keeps the trained weights for resume.

Nothing non-finite is saved: a non-finite loss or gradient norm makes the step skip its update,
decided on the device (a fused optimizer's `found_inf`, or the fp16 grad scaler's check), so
neither the weights nor the optimizer state change; the weights after each update are checked on
the device too. The host reads the verdicts at the next log window, evaluation or save: then
nonfinite=skip counts and logs each skipped step, nonfinite=stop stops with the first, before
anything is evaluated or written, and a checkpoint holding a NaN or inf is never written.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from seqexp.checkpoint import (Checkpoint, TrainerState, assemble, ema_state, load_model_state, nonfinite,
                               prune_step_checkpoints, rng_state, set_rng_state, step_name, trained_weights, write,
                               write_json)
from seqexp.data.shard import Sharded
from seqexp.distributed import Dist
from seqexp.ema import EMA
from seqexp.errors import UserError
from seqexp.evaluation import tracked
from seqexp.monitor import Monitor, metric_and_mode
from seqexp.plan import Estimate
from seqexp.preempt import Preempted
from seqexp.tasks import detach_state, to_device

log = logging.getLogger("seqexp")


class NonFiniteError(UserError):
    exit_code = 3


class Trainer:
    def __init__(self, cfg, *, model, data, optimizer, scheduler, logger, logging_cfg, run_dir: Path,
                 device: torch.device, total_steps: int, recipe: dict,
                 visuals: Optional[Callable[[torch.nn.Module, int, dict], None]] = None,
                 dist: Optional[Dist] = None, quiet: bool = False, metric_modes: Optional[dict] = None):
        # data: the whole dataset; its task decides the loss, the metrics and what is logged (tasks.py)
        self.cfg, self.model, self.data, self.task = cfg, model, data, data.task
        self.optimizer, self.scheduler, self.logger = optimizer, scheduler, logger
        self.logging_cfg = logging_cfg  # cfg.logging: how much the task hooks log (samples, wrong examples)
        self.run_dir, self.device, self.total_steps = Path(run_dir), device, total_steps
        self.recipe = recipe  # what rebuilds the run from a checkpoint alone: config, runtime facts, data state
        self.visuals = visuals  # TensorBoard figures after each evaluation (seqexp.visuals)
        self.quiet = quiet  # a sweep's job: what only a person watching would read (a text sample) is not printed
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist, self.is_main = dist, dist is None or dist.is_main  # only the main process writes
        # what this process iterates: under DDP its rows of every batch (data/shard.py)
        self.shard = data if dist is None else Sharded(data, dist.rank, dist.world_size)
        # compiled (and under DDP wrapped) forward for training; checkpoints and evaluation use the plain module
        net = dist.wrap(model) if dist is not None else model
        self.ddp = net if dist is not None else None  # its no_sync() skips the all-reduce of micro-batches
        self.eager = net
        # trainer.compile: torch.compile compiles at the first forward and backward; a model it
        # cannot compile trains eager from there, with one warning (first_compiled_step)
        self.net = torch.compile(net) if cfg.compile else net
        self._compile_pending = bool(cfg.compile)
        # every module, wrappers included (eager's are among them): train_step sets training mode
        # only when something (an evaluation) left one in eval mode; net.train() walks them all
        self._modules = list(self.net.modules())
        if device.type == "cuda":  # TF32 tensor-core matmuls and convolutions (trainer.tf32); a CPU has none
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
        self.stateful = model.stateful
        self.accumulate = cfg.accumulate  # micro-batches per optimizer step
        # optimizer steps; an epoch's last batches that do not fill a step are left out
        self.steps_per_epoch = data.num_batches("train", stateful=self.stateful) // self.accumulate
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights once
        self.num_params = sum(p.numel() for p in self.params)
        self._checked = [p for p in self.params if p.numel()]
        # finite weights <=> finite norms. The 2-norm in float64 is exact for any finite float32
        # weights (squares stay below 1e77) and ~7x cheaper on CPU than the inf-norm, which has
        # no fast kernel there (2.5 against 0.35 ms a step for nanoGPT's CPU shape); MPS has no
        # float64, and its float32 2-norm overflows only for weights near 1e19.
        self._norm_dtype = torch.float32 if device.type == "mps" else torch.float64
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(cfg.precision))
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        # fp16 needs loss scaling; its own inf checks skip overflowing steps
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

        self.step = self.epoch = self.batch_in_epoch = 0
        self.carried = None  # RNN state at the end of the last chunk
        # the monitored validation metric (trainer.monitor, mode) and early stopping (patience);
        # metric_modes: the names the data logs (Dataset.metric_modes), else the task's own
        self.monitor = Monitor(*metric_and_mode(cfg, self.task, metric_modes), cfg.patience, cfg.min_delta)
        self.stopped_early: Optional[int] = None  # the step at which patience ran out
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_metrics: dict = {}
        self.last_metrics: dict = {}
        self.skipped = 0  # batches dropped by nonfinite=skip
        self.elapsed = 0.0  # seconds in fit() before this process
        self.eval_s = 0.0  # of which evaluating and checkpointing (not training)
        self.extra_metrics: dict = {}  # e.g. test metrics, added by the task after training
        # loss, grad norm and step count summed on the device since the last log line (log_window)
        self.log_sums = torch.zeros(3, device=device)
        # whether the weights after the latest update are finite: a device flag, read with the
        # next step's finiteness check or before an evaluation or a save (no extra read per step)
        self._weights_ok = torch.ones((), dtype=torch.bool, device=device)
        # the non-finite guard, decided on the device (train_step): one row per step since the last
        # read, [not ok, loss, grad norm, weights finite before the step], read with the log
        # window's read and before any evaluation or save (settle)
        self._guard = torch.zeros(max(cfg.log_every, 1), 4, device=device)
        self._pending = 0  # rows written since the last read
        self._guard_from = 0  # the step that row 0 describes
        # Fused optimizers (torch's Adam, AdamW, Adagrad, SGD built with fused=True: optimizer YAMLs)
        # skip an update on a device flag, `found_inf`, as the fp16 grad scaler has them do: no host
        # read per step. The others (RMSprop, foreach and for-loop kernels) cannot: for them the
        # step reads the flag on the host before updating, as every step used to.
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.stop_signal: Optional[str] = None  # set by a signal handler; honoured between steps
        self.resumed_from: Optional[Path] = None  # never pruned by keep_last
        self.written: Optional[dict] = None  # the summary last written to metrics.json by this process
        self.forward_s: dict[str, float] = {}  # split -> seconds of its latest evaluation pass (estimates)
        self.training_over = False  # fit() has returned: what follows (the test split) may be abandoned
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None  # the weight average (trainer.ema > 0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> TrainerState:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "carried": self.carried,
            "best": self.best, "best_step": self.best_step, "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics, "skipped": self.skipped,
            "elapsed": self.wall_s(), "eval_s": self.eval_s, "ema_updates": self.ema.updates if self.ema else 0,
            "window": self.log_sums.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "monitor": self.monitor.state_dict(), "stopped_early": self.stopped_early,
            # under DDP (a collective): the global carried state, each rank's RNG and window
            **(self.dist.gather_trainer_state(self.carried, self.log_sums, self.model.state_batch_dim)
               if self.dist is not None else {}),
        }

    def load_state_dict(self, sd: TrainerState) -> None:
        for key in ("step", "epoch", "batch_in_epoch", "best", "best_step", "best_metrics",
                    "last_metrics", "skipped", "elapsed", "eval_s"):
            setattr(self, key, sd[key])
        carried = sd["carried"]
        if isinstance(carried, (tuple, list)):
            carried = tuple(t.to(self.device) for t in carried)
        self.carried = carried.to(self.device) if torch.is_tensor(carried) else carried
        self.log_sums = sd["window"].to(self.device)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        set_rng_state(sd["rng"])
        if "monitor" in sd:  # (checkpoints from before early stopping: no countdown yet)
            self.monitor.load_state_dict(sd["monitor"])
        self.stopped_early = sd.get("stopped_early")
        if self.dist is not None:
            self.carried, self.log_sums = self.dist.shard_trainer_state(
                sd, self.carried, self.log_sums, seed=self.cfg.seed, step=self.step,
                batch_dim=self.model.state_batch_dim)

    def restore(self, ckpt: Checkpoint, path: Path) -> None:
        """Continue from a checkpoint: the trained weights, everything in state_dict(), the average."""
        load_model_state(self.model, trained_weights(ckpt), path)
        self.load_state_dict(ckpt["trainer"])
        if self.ema is not None:
            self.ema = EMA(self.model, self.cfg.ema)  # from the weights, if EMA is turned on at this resume
            if (saved := ema_state(ckpt)) is not None:
                self.ema.load_state_dict(saved)
        self.resumed_from = Path(path)

    def checkpoint(self) -> Checkpoint:
        return assemble(self.recipe, self.model, self.state_dict(), self.ema)

    def averaged(self):
        """Inside the block the model holds the averaged weights (with EMA off: its own)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()

    def save(self, *names: str) -> Path:
        self.settle()  # a pending non-finite step: nonfinite=stop stops before anything is written
        ckpt = self.checkpoint()  # under DDP every rank takes part; rank 0 writes
        # the same answer on every rank (weights and optimizer state agree), so all stop together
        if bad := nonfinite(ckpt):
            raise self.nonfinite_error(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                       f"at step {self.step}; not saved", "Lower optimizer.lr or set trainer.grad_clip.")
        if self.is_main:
            write([self.ckpt_dir / n for n in names], ckpt)
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
        log.warning("%s received: %s (send it again to stop at once)", reason,
                    "abandoning the evaluation" if self.training_over else "stopping after this step")

    def any_rank(self, flag: bool) -> bool:
        """Under DDP: true on every rank when true on any, so all take the same branch."""
        return flag if self.dist is None else self.dist.any(flag)

    def stop(self) -> None:
        path = self.save_last()
        self.write_metrics("preempted")
        raise Preempted(f"{self.stop_signal or 'a signal to another rank'} after step {self.step}; saved {path}. "
                        f"Continue with: python scripts/train.py resume={self.run_dir}")

    @contextmanager
    def recording_end(self):
        """A run that ends with an exception leaves metrics.json saying how: "stopped: nonfinite",
        "interrupted" or "failed" (with the error), never "running". The rest stays what the last
        evaluation wrote, which describes last.pt. stop() wrote "preempted"; a run that finishes
        writes "finished" itself."""
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
                    write_json(self.run_dir / "metrics.json",
                               {**(self.written or self.summary(status)), "status": status, "error": error})
            except Exception as again:  # e.g. the directory that has just refused a checkpoint
                log.warning("metrics.json not updated (%s)", again)
            raise

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
        test = self.task.tests_on_best and "test" in self.data.splits  # after training (tasks.py)
        self.estimate = Estimate(self, test_batches=self.data.num_batches("test", stateful=self.stateful) if test else 0)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True, unit="step", desc="train")
        try:
            while not self.done:
                batches = self.shard.batches("train", stateful=self.stateful, epoch=self.epoch,
                                             start=self.batch_in_epoch)
                for micro in groups(batches, self.accumulate):
                    tokens_window += sum(b["num_tokens"] for b in micro) * (self.dist.world_size if self.dist else 1)
                    self.first_compiled_step(micro) if self._compile_pending else self.train_step(micro)
                    self.batch_in_epoch += len(micro)
                    self.step += 1
                    if self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        self.log_window(bar, tokens_window / max(now - t_window, 1e-9))
                        t_window, tokens_window = now, 0
                        self.estimate.window()  # the first window only: the training time left
                    if cfg.max_time_s and self.any_rank(self.train_s() >= cfg.max_time_s):
                        log.info("training-time budget of %.0f s reached at step %d", cfg.max_time_s, self.step)
                        self.total_steps = self.step  # this is the last step: evaluate and save below
                    if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                        self.evaluate_and_save()
                    elif self.step % cfg.checkpoint_every == 0:
                        self.save_last()
                    if self.any_rank(self.stop_signal is not None) and not self.done:
                        self.stop()  # (at the last step the run simply finishes)
                    if self.done:
                        break
                else:  # epoch exhausted: next epoch starts with a fresh state
                    self.epoch, self.batch_in_epoch, self.carried = self.epoch + 1, 0, None
            if not self.last_metrics:  # resumed a finished run: evaluate once for the summary
                self.evaluate_and_save()
            self.training_over = True
        finally:
            bar.close()
            self.logger.flush()
        return self.summary()

    @property
    def done(self) -> bool:
        """The last step is taken, or patience ran out (a decision saved with the checkpoint)."""
        return self.step >= self.total_steps or self.stopped_early is not None

    def train_step(self, micro: list[dict]) -> None:
        """One optimizer step on K micro-batches (K = trainer.accumulate; usually one batch)."""
        if not all(m.training for m in self._modules):  # (train() itself costs ~0.1 ms a step on a CPU)
            self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        # the step's loss is the mean over the loss terms of all K micro-batches: each micro-batch's
        # mean loss weighs its share of them (under DDP the global batch's terms: data/shard.py)
        terms = [b["batch_terms"] if "batch_terms" in b else self.task.loss_terms(b) for b in micro] \
            if len(micro) > 1 else [1]
        total = sum(terms)
        carried, loss = self.carried, torch.zeros((), device=self.device)
        for k, batch in enumerate(micro):
            batch = to_device(batch, self.device)
            state = detach_state(carried) if batch["carry"] else None  # truncate BPTT here
            last = k == len(micro) - 1  # DDP: all-reduce the summed gradients once, in the last backward
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.autocast():
                    logits, carried = self.net(batch["tokens"], batch.get("lengths"), state)
                part = self.task.loss(logits, batch)
                if "loss_scale" in batch:  # DDP: this rank's share of the global batch (data/shard.py)
                    part = part * batch["loss_scale"]
                if len(micro) > 1:
                    part = part * (terms[k] / total if total else 1.0 / len(micro))
                self.scaler.scale(part).backward()
            loss = loss + part.detach()
        if self.scaler.is_enabled():
            # fp16: an overflowing gradient is the scaler's to skip (and to lower its scale for), so
            # the loss and the weights decide here; a bad step's gradients are made NaN so that the
            # scaler's own inf check skips it (on the device for fused optimizers)
            ok = self.all_ranks(torch.isfinite(loss) & self._weights_ok)
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], torch.where(ok, 1.0, math.nan))
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if not self.scaler.is_enabled():
            ok = self.all_ranks(torch.isfinite(loss) & torch.isfinite(grad_norm) & self._weights_ok)
        # decided on the device, before the update: neither the weights nor the optimizer state
        # (nor so any checkpoint) ever see a NaN; the host reads the verdict later (settle)
        self.record(ok, loss, grad_norm)
        self.optimizer_step(ok)
        # a finite loss and gradient can still make the weights infinite (a huge lr x weight decay);
        # read with the next step's verdict
        self._weights_ok = torch.stack(torch._foreach_norm(self._checked, 2.0, dtype=self._norm_dtype)).isfinite().all()
        self.scaler.update()
        self.scheduler.step()  # on a skipped step too, as always: the schedule counts steps
        if self.ema is not None:
            self.ema.update(ok)  # a skipped step leaves the average as it is
        # a state that produced NaN is no start for the next chunk: zeros instead (what None means)
        self.carried = zeros_unless(ok, detach_state(carried)) if self.stateful else None
        self.log_sums += torch.where(ok, torch.stack([loss.detach().float(), grad_norm.detach().float(), ok.float()]),
                                     0.0)

    def all_ranks(self, ok: torch.Tensor) -> torch.Tensor:
        """Under DDP: a NaN loss on one rank stops or skips the step on all (a device all-reduce)."""
        return ok if self.dist is None else self.dist.all(ok)

    def optimizer_step(self, ok: torch.Tensor) -> None:
        """The update, or, when `ok` is false, none at all: weights and optimizer state untouched."""
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skipped by the scaler: the gradients were made NaN
        elif self.skips_on_device and self.optimizer.state:
            # the fused kernel leaves weights, moments and step count as they are when found_inf is
            # 1 (and undoes its step increment). Not on the first step, which creates the state:
            # torch's fused SGD with momentum then leaves its buffers uninitialised (empty_like)
            self.optimizer.found_inf = (~ok).float()
            try:
                self.scaler.step(self.optimizer)  # (disabled: optimizer.step())
            finally:
                del self.optimizer.found_inf
        elif bool(ok):  # the host read: this optimizer cannot skip on a device flag
            self.scaler.step(self.optimizer)
        else:
            self.settle()  # nonfinite=stop stops here, at the bad step

    def record(self, ok: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The step's verdict into the guard, on the device."""
        if self._pending == len(self._guard):  # (the window is longer than log_every: e.g. a resume)
            self.settle()
        if self._pending == 0:
            self._guard_from = self.step + 1
        self._guard[self._pending] = torch.stack([(~ok).float(), loss.detach().float(), grad_norm.detach().float(),
                                                  self._weights_ok.float()])
        self._pending += 1

    def settle(self, rows: Optional[list] = None) -> None:
        """Act on the non-finite steps since the last read, in order: skip (count, log) or stop.
        `rows`: the guard's rows if the caller has read them with its own read; else one read here."""
        if rows is None:
            rows = self._guard[:self._pending].tolist() if self._pending else []
        first, self._pending = self._guard_from, 0
        for i, (bad, loss, grad_norm, weights_ok) in enumerate(rows):
            if bad:
                self.handle_nonfinite(first + i, loss, grad_norm, bool(weights_ok))
        if rows and rows[-1][0]:
            self.optimizer.zero_grad(set_to_none=True)  # the latest step's gradients were not used

    def check_weights(self) -> None:
        """Stop when the latest update made the weights non-finite: no policy can undo an update."""
        self.settle()
        if not bool(self._weights_ok):
            raise self.weights_error(self.step)

    def weights_error(self, step: int) -> NonFiniteError:
        return self.nonfinite_error(
            f"the update at step {step} made the weights non-finite (its loss and gradient norm were "
            f"finite); they were neither evaluated nor saved", "Lower optimizer.lr or optimizer.weight_decay.")

    def nonfinite_error(self, what: str, advice: str) -> NonFiniteError:
        last = self.ckpt_dir / "last.pt"  # never non-finite: save() refuses to write one
        return NonFiniteError(f"{what}. Last good checkpoint: {last if last.exists() else 'none yet'}. {advice}")

    def handle_nonfinite(self, step: int, loss: float, grad_norm: float, weights_ok: bool) -> None:
        """Step `step` was not taken (its update skipped on the device): count it, or stop."""
        if not weights_ok:  # the previous update's weights, before blaming this batch
            raise self.weights_error(step - 1)
        what = f"loss={loss:.4g}, grad_norm={grad_norm:.4g}"
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

    def first_compiled_step(self, micro: list[dict]) -> None:
        """The first step of a compiled model, which compiles it: a model torch.compile cannot
        compile (at its first forward or backward) trains eager from here, with one warning."""
        self._compile_pending = False
        try:
            self.train_step(micro)
        except UserError:  # e.g. nonfinite=stop: not about compiling
            raise
        except Exception as e:
            reason = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
            log.warning("trainer.compile: %s does not compile (%s: %s); training eager",
                        type(self.model).__name__, type(e).__name__, reason)
            self.net = self.eager
            self.train_step(micro)

    def log_window(self, bar, tokens_per_s: float) -> None:
        # the one device read per window; under DDP the mean over ranks (the global batch's loss)
        window = self.log_sums if self.dist is None else self.dist.mean(self.log_sums)
        # with it, the non-finite guard's rows since the last read (one transfer)
        values = torch.cat([window, self._guard[:self._pending].flatten()]).tolist()
        loss_sum, gnorm_sum, n = values[:3]
        self.settle([values[i:i + 4] for i in range(3, len(values), 4)])
        self.log_sums.zero_()
        lr = self.optimizer.param_groups[0]["lr"]
        if n > 0:
            self.logger.scalars({"train/loss": loss_sum / n, "train/grad_norm": gnorm_sum / n}, self.step)
            bar.set_postfix_str(f"loss {loss_sum / n:.3f}  lr {lr:.2e}  {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
        self.logger.scalars({"train/lr": lr, "train/tokens_per_s": tokens_per_s}, self.step)
        bar.update(self.step - bar.n)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "val") -> dict:
        t0 = time.perf_counter()
        # a validation runs to its end before a stop (its result goes into the checkpoint); after
        # training a stop abandons the evaluation, which resuming from last.pt runs again
        batches = tracked(self.shard.batches(split, stateful=self.stateful),
                          total=self.shard.num_batches(split, stateful=self.stateful), desc=split,
                          show=self.cfg.progress and self.is_main,
                          stop=self.abandon_if_stopped if self.training_over else None)
        sums = self.task.sums(self.model, batches, self.device, self.autocast)
        self.forward_s[split] = time.perf_counter() - t0
        return self.task.metrics(sums if self.dist is None else self.dist.sum(sums))

    def abandon_if_stopped(self) -> None:
        """After training (between batches of the test split): a stop signal ends the run as
        preempted. Training is complete in last.pt, so `resume=` goes straight to the evaluation."""
        if not self.any_rank(self.stop_signal is not None):
            return
        self.write_metrics("preempted")
        raise Preempted(f"{self.stop_signal or 'a signal to another rank'} during the evaluation after training "
                        f"(step {self.step}); training is saved in {self.ckpt_dir / 'last.pt'}. "
                        f"Continue with: python scripts/train.py resume={self.run_dir}")

    def evaluate_and_save(self) -> None:
        t0 = time.perf_counter()
        self.check_weights()
        self.logger.scalars({"time/train_s": self.train_s()}, self.step)
        with self.averaged():  # what is validated is what is saved as the checkpoint's "model"
            metrics = self.evaluate("val")
            self.task.after_evaluation(self, "val", metrics, self.step)  # e.g. a text sample, a confusion matrix
            if self.visuals is not None:
                self.visuals(self.model, self.step, metrics)
        self.last_metrics = {f"val/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        self.logger.scalars(self.last_metrics, self.step)
        value = self.last_metrics[self.monitor.metric]
        better = self.monitor.better(value, self.best)  # strictly better (a NaN never is)
        if better:
            self.best, self.best_step, self.best_metrics = value, self.step, dict(self.last_metrics)
        self.monitor.update(value)
        if self.monitor.exhausted and self.step < self.total_steps and self.stopped_early is None:
            self.stopped_early = self.step  # decided before saving: a resume from here stops too
            log.info("early stop at step %d: %s has not improved by more than %g for %d evaluations (best %.4f "
                     "at step %s)", self.step, self.monitor.metric, self.monitor.min_delta, self.monitor.wait,
                     self.best if self.best is not None else math.nan, self.best_step)
        log.info("step %d: %s%s", self.step,
                 "  ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float)),
                 "  (best)" if better else "")
        if better:
            self.save("best.pt")
        self.save_last()
        self.write_metrics("running")
        self.logger.flush()
        self.eval_s += time.perf_counter() - t0
        self.estimate.evaluated(time.perf_counter() - t0, self.forward_s["val"],
                                self.data.num_batches("val", stateful=self.stateful))  # the first one only

    def summary(self, status: str = "finished") -> dict:
        return {
            "status": status,
            "task": self.task.name,
            "objective": {"metric": self.monitor.metric, "mode": self.monitor.mode, "best": self.best},
            # patience ran out: the step it stopped at (else null)
            "stopped_early": (None if self.stopped_early is None else
                              {"step": self.stopped_early, "patience": self.monitor.patience,
                               "min_delta": self.monitor.min_delta}),
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
            self.written = self.summary(status)  # what metrics.json says, should the run fail before the next
            write_json(self.run_dir / "metrics.json", self.written)


def zeros_unless(ok: torch.Tensor, state):
    """The carried state where ok, else zeros (a tensor or a tuple of them; decided on the device)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(zeros_unless(ok, s) for s in state)
    return torch.where(ok, state, 0.0)


def groups(batches, k: int):
    """Consecutive lists of k batches; a last list shorter than k is dropped (not a full step)."""
    it = iter(batches)
    while len(group := list(itertools.islice(it, k))) == k:
        yield group
