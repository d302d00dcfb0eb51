"""Hydra callback (configs/train.yaml, `hydra.callbacks`): the sweep summary when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("seqexp")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from seqexp.sweep.summary import write_summary  # only now: single runs never pay for it

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            written = write_summary(sweep_dir)
        except Exception as e:  # the jobs' results are on disk either way; summarize.py retries
            log.error("sweep summary failed (%s: %s); rerun: python scripts/summarize.py %s",
                      type(e).__name__, e, sweep_dir)
            return
        if written:
            log.info("sweep summary: %s", ", ".join(str(p) for p in written.values()))
            print((sweep_dir / "summary.md").read_text(), flush=True)
