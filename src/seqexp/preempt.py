"""Preemption: SIGTERM (schedulers, `kill`) or SIGINT (Ctrl-C) stops a run cleanly.

The first signal only sets a flag; the trainer finishes the step it is in, saves `last.pt` and
raises `Preempted`, which exits with code 75 (EX_TEMPFAIL: "try again" -- resume the run).
A second signal acts as it would without seqexp (KeyboardInterrupt, or termination): nothing
is lost by it either, since checkpoints are written atomically.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from seqexp.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UserError):
    exit_code = 75  # distinct from 1 (config), 2 (user error), 3 (non-finite)
    label = "stopped"  # not an error: the run is saved and resumable


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While inside, the first SIGTERM/SIGINT calls request_stop(name) instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, frame):
        for s, h in previous.items():  # a second signal gets the old behaviour
            signal.signal(s, h)
        request_stop(signal.Signals(signum).name)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
