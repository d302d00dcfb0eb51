"""Preemption: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) or submitit's time-limit signal
stops a run cleanly.

The first signal only sets a flag; the trainer finishes the step it is in, saves its last checkpoint and
raises `Preempted`, which exits with code 75 (EX_TEMPFAIL: "try again" -- resume the run).
A second SIGTERM/SIGINT acts as it would without seqexp (KeyboardInterrupt, or termination):
nothing is lost by it either, since checkpoints are written atomically.

A single run listens only while it trains (`stop_on_signals`). A sweep (`-m`) listens for the
life of each process (`listen`), so a signal between jobs, or before training starts, counts too:
- every process remembers its first signal (`received()`): a job that is training stops as above,
  is recorded as interrupted, and no further job starts (sweep/job.py);
- the sweep process passes the stop on to its job processes (joblib's workers), which a `kill`
  of the sweep process alone does not reach: it sends FORWARD to each child that handles it.
  Ctrl-C in a terminal reaches every process of the group anyway; FORWARD is never taken for a
  second signal, so getting both is one stop;
- in a submitit job, submitit's own signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise;
  SLURM sends it `signal_delay_s` before the time limit) stops the run the same way, and once
  the last checkpoint is saved `hand_over()` calls the handler submitit had installed: it requeues the job
  and exits, and the requeued job continues from it. (Left alone, submitit's handler
  requeues at once, from inside whatever step is running, and the steps since the last periodic
  checkpoint are lost.)
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from seqexp.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARD = signal.SIGUSR1  # sweep process -> its job processes (submitit's own signal is USR2)
FORWARDED_NAME = "a stop signal to the sweep"  # what FORWARD stands for, in messages


class Preempted(UserError):
    exit_code = 75  # distinct from 1 (config), 2 (user error), 3 (non-finite)
    label = "stopped"  # not an error: the run is saved and resumable


_received: Optional[str] = None  # the first stop signal's name
_requests: list[Callable[[str], None]] = []  # told the first signal: the running trainer, the sweep
_previous: dict[int, object] = {}  # handlers before ours: a second signal, submitit's hand-over
_listening = False  # listen() was called: ours until the process ends
_sweep_process = False  # this process runs the sweep (and forwards)


def received() -> Optional[str]:
    """The first stop signal this process got while listening (None: none)."""
    return _received


def is_sweep_process() -> bool:
    return _sweep_process


def submitit_signal() -> Optional[signal.Signals]:
    """submitit's preemption/time-limit signal when this process is a submitit job, else None.
    As submitit.JobEnvironment._usr_sig; SUBMITIT_FOLDER is set by submitit's job runner."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _handler(signum: int, frame) -> None:
    global _received
    if signum in SIGNALS:  # a second SIGTERM/SIGINT gets the old behaviour
        for s in SIGNALS:
            if s in _previous:
                signal.signal(s, _previous[s])
    if _received is not None:
        return
    _received = FORWARDED_NAME if signum == FORWARD else signal.Signals(signum).name
    for request_stop in list(_requests):
        request_stop(_received)
    if _sweep_process:
        forward_to_jobs()


def _install(signals) -> None:
    for s in signals:
        _previous[s] = signal.getsignal(s)
        signal.signal(s, _handler)


def _uninstall() -> None:
    global _received
    for s, h in _previous.items():
        signal.signal(s, h)
    _previous.clear()
    _received = None


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While inside, the first stop signal calls request_stop(name) instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only
        return
    own = not _listening  # a single run: our handlers only while training
    if own:
        _install(SIGNALS)
    _requests.append(request_stop)
    if _received is not None:  # a sweep's process got it before training started
        request_stop(_received)
    try:
        yield
    finally:
        _requests.remove(request_stop)
        if own:
            _uninstall()


def listen(*, sweep_process: bool = False, on_stop: Optional[Callable[[str], None]] = None) -> None:
    """From now until the process ends, remember the first stop signal (sweeps; see above).
    `sweep_process`: this process runs the sweep, so it forwards the stop to its job processes.
    `on_stop(name)` is called at the first signal."""
    global _listening, _sweep_process
    _sweep_process = _sweep_process or sweep_process
    if on_stop is not None:
        _requests.append(on_stop)
    if _listening or threading.current_thread() is not threading.main_thread():
        return
    extra = [s for s in (FORWARD, submitit_signal()) if s is not None and s not in SIGNALS]
    _install([*SIGNALS, *dict.fromkeys(extra)])
    _listening = True


def hand_over() -> None:
    """After submitit's signal stopped the run and the last checkpoint is saved: call the handler submitit
    installed for it, which requeues the job and exits (SystemExit). Otherwise nothing."""
    sig = submitit_signal()
    if sig is None or _received != sig.name:
        return
    handler = _previous.get(sig)
    if callable(handler):
        handler(sig, None)


def forward_to_jobs() -> None:
    """Send FORWARD to this process's children that handle it (job processes that listen; not
    loky's resource tracker or submitit's controller). Linux: reads /proc; elsewhere nothing."""
    me, bit = os.getpid(), 1 << (FORWARD - 1)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            if ppid != me:
                continue
            status = (stat.parent / "status").read_text()
            caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
            if int(caught.split()[1], 16) & bit:
                os.kill(int(stat.parent.name), FORWARD)
        except (OSError, ValueError, IndexError, StopIteration):
            continue  # gone meanwhile, or not ours to read
