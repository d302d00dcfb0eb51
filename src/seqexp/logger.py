"""One small logger: namespaced scalars and text to TensorBoard, a line per evaluation to the console."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("seqexp")


class Logger:
    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops events logged after its checkpoint, so no step repeats
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

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

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
