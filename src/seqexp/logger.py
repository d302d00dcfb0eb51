"""One small logger: namespaced scalars, text and pictures, fanned out to the backends the config
lists (`logging.backends`: TensorBoard, MLflow). The trainer and the reports call the `Logger`;
which backends are on is decided once, in `open_logger`, and nothing else asks."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")


class Backend:
    """Where a logger writes. Each method does nothing here: a backend implements what it can show."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def image(self, tag: str, rgb, step: int) -> None: ...  # rgb: (H, W, 3) uint8

    def histogram(self, tag: str, values, step: int) -> None: ...

    def figure(self, tag: str, fig, step: int) -> None: ...  # a matplotlib Figure

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Backend):
    """Event files in the run directory."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        after_existing_events(RunDir(run_dir))
        # purge_step: a resumed run drops events logged after its checkpoint, so no step repeats
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders markdown: indent by 4 so text shows verbatim
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def image(self, tag: str, rgb, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.writer.add_figure(tag, fig, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Logger:
    def __init__(self, backends: Sequence[Backend] = ()):
        self.backends = list(backends)

    @property
    def enabled(self) -> bool:
        """False: every call is a no-op, so work done only to be logged can be skipped."""
        return bool(self.backends)

    def scalars(self, metrics: dict, step: int, prefix: str = "") -> None:
        values = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        for b in self.backends:
            b.scalars(values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for b in self.backends:
            b.text(tag, text, step)

    def image(self, tag: str, rgb, step: int) -> None:
        """rgb: (H, W, 3) uint8 array."""
        for b in self.backends:
            b.image(tag, rgb, step)

    def histogram(self, tag: str, values, step: int) -> None:
        for b in self.backends:
            b.histogram(tag, values, step)

    def confusion(self, tag: str, matrix: list[list[int]], step: int, labels=None) -> None:
        """A confusion matrix (rows: true class, columns: predicted) as a figure, drawn once."""
        if not self.backends:
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
        for b in self.backends:
            b.figure(tag, fig, step)

    def flush(self) -> None:
        for b in self.backends:
            b.flush()

    def close(self) -> None:
        """Every backend is closed, even when one fails (the first error is raised after)."""
        error = None
        for b in self.backends:
            try:
                b.close()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error


def tensorboard_on(logging_cfg) -> bool:
    """TensorBoard is listed in logging.backends and not switched off by the older logging.tensorboard."""
    return "tensorboard" in logging_cfg.backends and bool(logging_cfg.tensorboard)


def open_logger(cfg, run: RunDir, *, resumed_step: Optional[int] = None, sweep: Optional[Path] = None) -> Logger:
    """The logger of the run in `run`, with a backend per entry of cfg.logging.backends.
    `resumed_step`: the step of the checkpoint a resumed run continues from (each backend
    continues its run after it); `sweep`: the sweep directory of a multirun's job."""
    backends: list[Backend] = []
    if tensorboard_on(cfg.logging):
        backends.append(TensorBoard(run.path, purge_step=None if resumed_step is None else resumed_step + 1))
    if "mlflow" in cfg.logging.backends:
        from seqexp.mlflow_backend import MLflow  # only now: importing mlflow takes seconds

        backends.append(MLflow(cfg, run, resumed=resumed_step is not None, sweep=sweep))
    return Logger(backends)


def after_existing_events(run: RunDir) -> None:
    """TensorBoard reads a run's event files in the order of their names, whose first field is the
    second the file was created in (then host, pid and a per-process counter, compared as text:
    "10" before "9"). A writer created in the same second as one already there may sort before
    it, and a resumed run's purge of the steps after its checkpoint would then hide its own new
    events instead of the old ones. So a new file waits, if need be, for a later second (< 1 s)."""
    seconds = [int(p.name.split(".")[3]) for p in run.events() if p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)
