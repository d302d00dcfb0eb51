"""One writer at a time: file locks for shared caches and for run directories.

Locks are `fcntl.flock` locks on a small lock file beside what they protect. The kernel drops
them when the process ends, however it ends, so a killed run never leaves a lock held. The
holder removes the lock file when it is done; a process that was waiting on a file removed
meanwhile opens the new one (the inode check below), so two processes never both hold a lock.

- `file_lock(path)`: wait for the lock (caches: the second process reads what the first wrote).
- `hold_run_dir(run_dir)` / `release_run_dir`: do not wait; a run directory in use refuses a
  second run at once. `claim_output_dir` creates, checks and locks it before Hydra writes there:
  of two runs started at once into one new directory, the second writes nothing.
- `local_main_first`: under torchrun, one process per machine prepares the data first.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from seqexp.errors import UserError
from seqexp.overrides import last_value
from seqexp.rundir import RunDir


class Busy(Exception):
    """The lock is held by another process (non-blocking `file_lock`)."""


@contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, removed on release)."""
    path = Path(path)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in {path.parent} ({e.strerror or e}); make it writable or choose "
                            f"another directory.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy(str(path)) from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder may have removed the file between our open and our lock: then the
        # lock we hold is on a file nobody else will open; take the current one instead
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still locked: see the module docstring
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- run directories
_held: dict[Path, list] = {}  # run dir -> [context manager, holders in this process]


@atexit.register
def _release_all() -> None:
    """The kernel drops the locks at exit anyway; this also removes their files."""
    for lock, _ in list(_held.values()):
        lock.__exit__(None, None, None)
    _held.clear()


def hold_run_dir(run_dir: Path, resuming: bool = False) -> None:
    """Lock `run_dir` for this process (re-entrant); refuse with one line if another process has it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    lock = file_lock(RunDir(key).lock, wait=False)
    try:
        lock.__enter__()
    except Busy:
        what = f"its lock {RunDir.LOCK} is held"
        if resuming:
            raise UserError(f"{run_dir} is in use: another process is writing this run ({what}); wait for it to "
                            f"end, then resume it.") from None
        raise UserError(f"{run_dir} is in use by another run ({what}); give this run another hydra.run.dir, or "
                        f"wait for that one to end.") from None
    _held[key] = [lock, 1]


def release_run_dir(run_dir: Path) -> None:
    """Undo one `hold_run_dir`; the lock goes with the last one (or when the process ends)."""
    key = Path(run_dir).resolve()
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        lock, _ = _held.pop(key)
        lock.__exit__(None, None, None)


def hydra_dir(argv: list[str]) -> tuple[Path, bool]:
    """(the directory Hydra will write this run or sweep in, or the deepest one known before
    Hydra resolves `${...}` in it; whether that is the directory itself)."""
    key = "hydra.sweep.dir" if "-m" in argv or "--multirun" in argv else "hydra.run.dir"
    value = str(last_value(argv, key, "outputs/${now:...}"))  # the default: configs/train.yaml
    if "${" not in value:
        return Path(value).expanduser().absolute(), True
    prefix = value[: value.index("${")]
    return Path(prefix if prefix.endswith("/") else os.path.dirname(prefix) or ".").expanduser().absolute(), False


def check_writable(directory: Path, fix: str = "Give a writable hydra.run.dir=DIR (or fix the permissions).") -> None:
    """One line naming the directory when a run could not write there (Hydra's own failure is a
    traceback from its logging set-up)."""
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise UserError(f"cannot create the run directory {directory}: {d} is a file. {fix}")
    run = RunDir(directory)
    targets = [d] + ([run.path / RunDir.LOG, run.path / RunDir.HYDRA, run.checkpoints] if d == directory else [])
    for t in targets:
        if t.exists() and not os.access(t, os.W_OK | (os.X_OK if t.is_dir() else 0)):
            raise UserError(f"cannot write the run directory {directory}: {t} is read-only. {fix}")


def claim_output_dir(argv: list[str], overwrite: bool = False) -> Optional[Path]:
    """Before Hydra writes anything: refuse a run directory that is not writable; when the run's
    directory is known exactly (an explicit hydra.run.dir, or a resume), create and lock it, so
    that a second run there is refused before Hydra touches its files, and refuse a new run in
    a directory that holds one (`overwrite`: move that run aside first, never delete it).
    -> the directory locked (for `release_run_dir`), or None. Other processes of a torchrun job
    neither check nor lock."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    directory, exact = hydra_dir(argv)
    sweep = "-m" in argv or "--multirun" in argv
    resuming = last_value(argv, "resume") is not None
    if resuming:
        fix = "A resume writes into its run: copy the run somewhere writable and resume the copy."
    else:
        fix = f"Give a writable hydra.{'sweep' if sweep else 'run'}.dir=DIR (or fix the permissions)."
    check_writable(directory, fix)
    if not exact or sweep:  # a `${now:...}` directory is new (microseconds); a sweep's jobs are its own
        return None
    directory.mkdir(parents=True, exist_ok=True)
    hold_run_dir(directory, resuming)
    run = RunDir(directory)
    if resuming or not run.holds_run():
        return directory
    release_run_dir(directory)
    if not overwrite:
        raise UserError(f"{directory} holds a run already; continue it with resume={directory}, give this run "
                        f"another hydra.run.dir, or add trainer.overwrite=true to move that run aside (to "
                        f"{directory.name}.old-<date>-<time> beside it).")
    moved = run.move_aside()
    print(f"trainer.overwrite=true: the run that was in {directory} is now in {moved}", file=sys.stderr, flush=True)
    directory.mkdir()
    hold_run_dir(directory)
    return directory


@contextmanager
def local_main_first(local_rank: int, barrier) -> Iterator[None]:
    """Under torchrun: the first process of each machine runs the body (downloads, tokenizes,
    writes the cache) while the machine's other processes wait, then they run it (and read the
    cache). `barrier` synchronises all processes; None in a single process."""
    if barrier is None:
        yield
        return
    first = local_rank == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:  # also after a failure, so that the others do not wait forever (they fail too)
            barrier()
