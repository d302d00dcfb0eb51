"""One writer at a time: file locks for shared caches and for run directories.

Locks are `fcntl.flock` locks on a small lock file beside what they protect. The kernel drops
them when the process ends, however it ends, so a killed run never leaves a lock held. The
holder removes the lock file when it is done; a process that was waiting on a file removed
meanwhile opens the new one (the inode check below), so two processes never both hold a lock.

- `file_lock(path)`: wait for the lock (caches: the second process reads what the first wrote).
- `hold_run_dir(run_dir)` / `release_run_dir`: do not wait; a run directory in use refuses a
  second run at once. `claim_output_dir` checks and locks it before Hydra writes there.
- `local_main_first`: under torchrun, one process per machine prepares the data first.
"""

from __future__ import annotations

import atexit
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from seqexp.errors import UserError

RUN_LOCK = ".seqexp.lock"  # in a run directory, while a run writes there


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


def hold_run_dir(run_dir: Path) -> None:
    """Lock `run_dir` for this process (re-entrant); refuse with one line if another process has it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    lock = file_lock(key / RUN_LOCK, wait=False)
    try:
        lock.__enter__()
    except Busy:
        raise UserError(f"{run_dir} is in use by another run (it holds {RUN_LOCK} there); give this run "
                        f"another hydra.run.dir, or wait for that one to end.") from None
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
    key = "hydra.sweep.dir=" if "-m" in argv or "--multirun" in argv else "hydra.run.dir="
    given = [a[len(key):] for a in argv if a.startswith(key)]
    value = given[-1] if given else "outputs/${now:...}"  # configs/train.yaml
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting (resume.py)
        value = value[1:-1].replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
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
    targets = [d] + ([directory / n for n in ("seqexp.log", ".hydra", "checkpoints")] if d == directory else [])
    for t in targets:
        if t.exists() and not os.access(t, os.W_OK | (os.X_OK if t.is_dir() else 0)):
            raise UserError(f"cannot write the run directory {directory}: {t} is read-only. {fix}")


def claim_output_dir(argv: list[str]) -> Optional[Path]:
    """Before Hydra writes anything: refuse a run directory that is not writable, and lock an
    existing one (a resume, or an explicit hydra.run.dir) so that a second run there is refused
    before Hydra touches its files. -> the directory locked (for `release_run_dir`), or None.
    Other processes of a torchrun job neither check nor lock."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    directory, exact = hydra_dir(argv)
    sweep = "-m" in argv or "--multirun" in argv
    if any(a.startswith("resume=") for a in argv):
        fix = "A resume writes into its run: copy the run somewhere writable and resume the copy."
    else:
        fix = f"Give a writable hydra.{'sweep' if sweep else 'run'}.dir=DIR (or fix the permissions)."
    check_writable(directory, fix)
    if exact and directory.is_dir() and not sweep:
        hold_run_dir(directory)
        return directory
    return None


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
