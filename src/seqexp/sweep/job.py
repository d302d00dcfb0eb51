"""One job of a multirun (`-m`): what happens around `train()` so that a sweep outlives its jobs.

- A job that fails (a bad combination, a missing file, non-finite loss, out of memory) is
  recorded in its record as `status: failed` with the error, and the sweep goes on;
  `sweep.fail_fast=true` stops the sweep instead. (Left to Hydra, a job's `sys.exit` ends the
  whole sweep at once, and a job's exception ends it after its batch with no summary.)
- Re-running a sweep into the same `hydra.sweep.dir` skips jobs that finished with the same
  config (their objective is returned again, so Optuna sees it) and continues unfinished ones
  from their last checkpoint (`continue_or_restart`, the seam with `resume=RUN_DIR`).
- A stop signal (Ctrl-C, SIGTERM, submitit's time-limit signal; preempt.py) stops the running
  job as it stops a single run, after saving its last checkpoint; the job is recorded as
  `interrupted`, no further job starts, and re-running the sweep continues it. In the sweep's own
  process (basic launcher) the sweep ends at once (callback.end_sweep: summary, exit 75); a job
  process (joblib worker) returns, and so does every job it is given after. Under submitit the
  job is then handed back to submitit, which requeues it.
- Parallel jobs get their share of threads and a GPU each (resources.py); every job ends by
  writing its TensorBoard HParams (hparams.py).
- A job of several processes (submitit's tasks_per_node > 1: DDP) decides together and only its
  rank 0 writes here; all ranks read before any of them writes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from seqexp import distributed, preempt
from seqexp.config import to_container
from seqexp.errors import UserError
from seqexp.files import read_json, write_json
from seqexp.hparams import hparam_values, write_hparams
from seqexp.logger import tensorboard_on
from seqexp.preempt import Preempted
from seqexp.rundir import RunDir
from seqexp.sweep.callback import end_sweep, stopped
from seqexp.sweep.resources import configure_job, parallel_jobs

log = logging.getLogger("seqexp")

NOT_HASHED = ("sweep", "resume")  # how to run a job, not what it computes


def config_hash(cfg: DictConfig) -> str:
    c = to_container(cfg)
    for key in NOT_HASHED:
        c.pop(key, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def continue_or_restart(cfg: DictConfig, run: RunDir, may_continue: bool, sweep_dir: Path) -> dict:
    """Run the job; an unfinished one continues from its last checkpoint (`resume=RUN_DIR`:
    continue the run in RUN_DIR from its last checkpoint). This is the one place that knows
    about resuming."""
    from seqexp.train import train  # torch

    unfinished = may_continue and run.last.is_file()
    distributed.barrier()  # DDP: every rank has looked before rank 0 clears anything
    if unfinished:
        log.info("%s: continuing from %s", run.path.name, run.last.relative_to(run.path))
        cfg.resume = str(run.path)
        return train(cfg, run.path, sweep=sweep_dir)
    if distributed.is_main():
        run.clear_results()  # no old checkpoint, record or events to mix with the new ones
    return train(cfg, run.path, sweep=sweep_dir)  # (a sweep's job: HParams from here; no sample printed per job)


def describe(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:500]


def record(run: RunDir, status: str, error: str) -> dict:
    """Mark the job in its record, keeping whatever the trainer wrote at its last evaluation."""
    metrics = run.read_metrics() or {}
    metrics.update(status=status, error=error)
    if distributed.is_main():
        run.write_metrics(metrics)
    return metrics


def drop_if_unused(run: RunDir) -> None:
    """A job that never started: remove the directory Hydra just made for it, unless it holds
    anything besides Hydra's own files (results of an earlier run of the sweep stay)."""
    try:
        if distributed.is_main() and run.only_hydra_files():
            shutil.rmtree(run.path)
    except OSError:
        pass


def end_sweep_here(sweep_dir: Path) -> None:
    """In the sweep's own process (basic launcher), end the sweep now: summary and exit code
    (callback.end_sweep). In a job process, nothing: the job returns, the sweep process ends it."""
    if preempt.is_sweep_process():
        end_sweep(sweep_dir)


def safe_write_hparams(cfg: DictConfig, run: RunDir, name: str, overrides: list[str], metrics: dict) -> None:
    if not tensorboard_on(cfg.logging) or not distributed.is_main():
        return
    try:
        write_hparams(run.path, name, hparam_values(cfg, overrides), metrics, metrics.get("status", ""))
    except Exception as e:  # the job's results matter more than its HParams entry
        log.warning("%s: HParams not written (%s)", name, describe(e))


def run_sweep_job(cfg: DictConfig, hydra_cfg: DictConfig) -> Optional[float]:
    """Returns the job's objective (best validation metric), or None when it failed."""
    run_dir = Path(hydra_cfg.runtime.output_dir)
    run = RunDir(run_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    name = run_dir.relative_to(sweep_dir).as_posix() if run_dir.is_relative_to(sweep_dir) else run_dir.name
    overrides = list(hydra_cfg.overrides.task)
    digest = config_hash(cfg)
    why = stopped(sweep_dir)
    if why:  # the sweep was stopped: no further job starts
        log.info("%s: not started (%s)", name, why)
        drop_if_unused(run)
        end_sweep_here(sweep_dir)
        return None

    previous, metrics = read_json(run.job), run.read_metrics()
    has_results = run.holds_results()
    if has_results and (previous or {}).get("config_hash") != digest:
        # Same overrides, different config: the YAML files changed since. Never mix the two.
        message = (f"{run_dir} holds results of another config (config files changed since it ran); "
                   f"not run. Use a new hydra.sweep.dir, or delete that directory.")
        log.error(message)
        if cfg.sweep.fail_fast:
            print(f"error: {message}", file=sys.stderr, flush=True)
            end_sweep_here(sweep_dir)
            sys.exit(2)
        return None
    if has_results and cfg.sweep.skip_finished and metrics and metrics.get("status") == "finished":
        log.info("%s: finished in an earlier run of this sweep; skipped", name)
        return metrics["objective"]["best"]

    resources = configure_job(parallel_jobs(hydra_cfg.get("launcher")), int(hydra_cfg.job.num),
                              sweep_dir / ".locks", str(cfg.trainer.device))
    if distributed.is_main():
        write_json(run.job, {"config_hash": digest, "overrides": overrides, "resources": resources})
    try:
        metrics = continue_or_restart(cfg, run, may_continue=cfg.sweep.skip_finished, sweep_dir=sweep_dir)
    except Preempted:  # saved its last checkpoint; a re-run of the sweep continues from it
        steps = (run.read_metrics() or {}).get("steps")
        reason = stopped(sweep_dir) or "a stop signal to another rank"
        metrics = record(run, "interrupted", f"{reason}, after step {steps}")
        log.warning("%s interrupted: %s; re-run the sweep to continue it", name, metrics["error"])
        safe_write_hparams(cfg, run, name, overrides, metrics)
        preempt.hand_over()  # under submitit, after its signal: it requeues the job (and exits)
        end_sweep_here(sweep_dir)
        return None
    except KeyboardInterrupt:
        safe_write_hparams(cfg, run, name, overrides, record(run, "interrupted", "KeyboardInterrupt"))
        raise
    except Exception as e:
        if os.environ.get("SEQEXP_DEBUG"):
            raise
        message = describe(e)
        log.error("%s failed: %s", name, message, exc_info=not isinstance(e, UserError))
    else:
        safe_write_hparams(cfg, run, name, overrides, metrics)
        if preempt.received():  # came after training (test split, sample): the job is done, the sweep is not
            end_sweep_here(sweep_dir)
        return metrics["objective"]["best"]

    # out of the except block, so the traceback no longer holds the failed job's tensors
    gc.collect()
    _empty_cuda_cache()
    metrics = record(run, "failed", message)
    safe_write_hparams(cfg, run, name, overrides, metrics)
    if cfg.sweep.fail_fast:
        print(f"error: {name}: {message}\nsweep stopped (sweep.fail_fast=true)", file=sys.stderr, flush=True)
        end_sweep_here(sweep_dir)  # the summary first
        sys.exit(2)
    if preempt.received():  # failed while stopping: the sweep still stops
        end_sweep_here(sweep_dir)
    return None


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
