"""`trainer.profile=true`: torch.profiler around a few training steps, once per run.

The first step is left out (allocations, cuDNN's and torch.compile's first calls), then one step
waits, one warms the profiler up, and three are recorded: steps 4 to 6 of the run (of the resumed
part, on a resume). The trace goes into the run directory's `profile/` folder, in the Chrome
trace format that TensorBoard's profiler plugin (`tensorboard --logdir RUN/profile`) and Perfetto
(ui.perfetto.dev, open the .pt.trace.json) read, and the operators that took the most time are
logged as a table. The profiler stops right after: the rest of the run pays nothing for it.

Only the main process profiles (under DDP every rank runs the same steps). Without
`trainer.profile` the trainer holds a `NoProfile`, whose operations do nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

log = logging.getLogger("seqexp")

WAIT, WARMUP, ACTIVE = 1, 1, 3
TOP = 15  # operators in the table


class Profile:
    def __init__(self, directory: Path, device: torch.device):
        self.directory, self.device = Path(directory), device
        self.profiler = None
        self.written = False

    def step(self) -> None:
        """After each training step. The first call starts the profiler (so step 1 is never in
        the trace); the one after the last recorded step writes the trace and stops it."""
        if self.written:
            return
        if self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = torch.profiler.profile(
                activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
                on_trace_ready=self.ready, record_shapes=True)
            self.profiler.start()
            return
        self.profiler.step()
        if self.written:
            self.profiler.stop()
            self.profiler = None

    def ready(self, profiler: torch.profiler.profile) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensorboard_trace_handler(str(self.directory), worker_name="rank0")(profiler)
        sort = "self_cpu_time_total" if self.device.type == "cpu" else "self_device_time_total"
        log.info("trainer.profile: %d steps recorded; trace in %s; the top operators by %s:\n%s", ACTIVE,
                 self.directory, sort, profiler.key_averages().table(sort_by=sort, row_limit=TOP))
        self.written = True

    def close(self) -> None:
        """At the end of training: a run shorter than the schedule writes what it recorded, if anything."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if not self.written:
            log.warning("trainer.profile: the run ended before the profiled steps (%d to %d); no trace written",
                        WAIT + WARMUP + 2, WAIT + WARMUP + ACTIVE + 1)
            self.written = True


class NoProfile:
    """trainer.profile=false."""

    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


def profiling(enabled: bool, directory: Path, device: torch.device) -> Profile | NoProfile:
    return Profile(directory, device) if enabled else NoProfile()
