"""Hydra callback (configs/train.yaml, `hydra.callbacks`): the sweep process listens for stop
signals from the start (preempt.listen), and writes the summary and sets the exit code at the end.

Exit codes of a sweep, each after the summary is written: 0 no job failed; 2 a job of the sweep
directory failed (also when sweep.fail_fast stopped the sweep); 75 a job is interrupted or the
sweep was stopped by a signal: repeat the command with hydra.sweep.dir=<the sweep dir> to continue.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqexp import preempt

log = logging.getLogger("seqexp")

INTERRUPTED_EXIT = 75  # as a single run stopped by a signal (preempt.Preempted)
FAILED_EXIT = 2
# Written by the sweep process at its first stop signal: a job that starts after it does not run,
# also in a worker that did not listen yet when the signal was forwarded (one still starting).
STOP_FILE = ".stopped"


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # left by the run this one continues
        preempt.listen(sweep_process=True, on_stop=lambda name: mark_stopped(sweep_dir, name))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        end_sweep(Path(str(config.hydra.sweep.dir)))


def mark_stopped(sweep_dir: Path, name: str) -> None:
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / STOP_FILE).write_text(name + "\n")
    except OSError as e:  # the forwarded signal still stops the jobs that run
        log.warning("%s not written (%s)", sweep_dir / STOP_FILE, e)


def stopped(sweep_dir: Path) -> str | None:
    """Why the sweep was stopped, or None: the signal the sweep process got (STOP_FILE; a job
    process gets it forwarded, as FORWARD), else this process's own first signal."""
    try:
        return (Path(sweep_dir) / STOP_FILE).read_text().strip() or "stopped"
    except OSError:
        return preempt.received()


def write_and_print_summary(sweep_dir: Path) -> None:
    from seqexp.sweep.summary import write_summary  # only now: single runs never pay for it

    try:
        written = write_summary(sweep_dir)
    except Exception as e:  # the jobs' results are on disk either way; summarize.py retries
        log.error("sweep summary failed (%s: %s); rerun: python scripts/summarize.py %s",
                  type(e).__name__, e, sweep_dir)
        return
    if written:
        log.info("sweep summary: %s", ", ".join(str(p) for p in written.values()))
        print((sweep_dir / "summary.md").read_text(), flush=True)


def job_statuses(sweep_dir: Path) -> dict[str, str]:
    from seqexp.sweep.summary import find_jobs, load_job

    statuses = {}
    for d in find_jobs(sweep_dir):
        try:
            statuses[d.relative_to(sweep_dir).as_posix()] = load_job(d, sweep_dir)["status"]
        except Exception:  # an unreadable job directory is the summary's to report
            continue
    return statuses


def end_sweep(sweep_dir: Path) -> None:
    """Write the summary; then exit 75 when the sweep was stopped or a job is interrupted, 2 when
    a job failed, else return (exit 0)."""
    sweep_dir = Path(sweep_dir)
    write_and_print_summary(sweep_dir)
    statuses = job_statuses(sweep_dir)
    interrupted = [j for j, s in statuses.items() if s == "interrupted"]
    failed = [j for j, s in statuses.items() if s == "failed"]
    if preempt.received() or interrupted:
        print(f"stopped: {preempt.received() or 'a job was interrupted'}; interrupted jobs: "
              f"{', '.join(interrupted) or 'none'} (each saved its last checkpoint). Continue with the same "
              f"command and hydra.sweep.dir={sweep_dir}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)
    if failed:
        print(f"error: {len(failed)} of {len(statuses)} jobs failed: {', '.join(failed)}; "
              f"see {sweep_dir / 'summary.md'}", file=sys.stderr, flush=True)
        sys.exit(FAILED_EXIT)
