"""One small logger: namespaced scalars and text to TensorBoard, a line per evaluation to the console."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")


class Logger:
    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            after_existing_events(RunDir(run_dir))
            # purge_step: a resumed run drops events logged after its checkpoint, so no step repeats
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        """False: every call is a no-op, so work done only to be logged can be skipped."""
        return self.writer is not None

    def scalars(self, metrics: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown: indent by 4 so text shows verbatim
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def image(self, tag: str, rgb, step: int) -> None:
        """rgb: (H, W, 3) uint8 array."""
        if self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def confusion(self, tag: str, matrix: list[list[int]], step: int, labels=None) -> None:
        """A confusion matrix (rows: true class, columns: predicted) as an image."""
        if self.writer is None:
            return
        from matplotlib.figure import Figure  # imported on first use: language models never pay for it

        n = len(matrix)
        labels = list(labels or range(n))
        fig = Figure(figsize=(3.2, 3.0), dpi=100)
        ax = fig.subplots()
        ax.imshow(matrix, cmap="Blues", vmin=0)
        ax.set(xticks=range(n), yticks=range(n), xticklabels=labels, yticklabels=labels,
               xlabel="predicted", ylabel="true", title=f"{tag} @ {step}")
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > top / 2 else "black")
        fig.tight_layout()
        self.writer.add_figure(tag, fig, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def after_existing_events(run: RunDir) -> None:
    """TensorBoard reads a run's event files in the order of their names, whose first field is the
    second the file was created in (then host, pid and a per-process counter, compared as text:
    "10" before "9"). A writer created in the same second as one already there may sort before
    it, and a resumed run's purge of the steps after its checkpoint would then hide its own new
    events instead of the old ones. So a new file waits, if need be, for a later second (< 1 s)."""
    seconds = [int(p.name.split(".")[3]) for p in run.events() if p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)
