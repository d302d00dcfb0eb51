"""The run directory: the one place that names its files. Every command, the sweep, resume and
the trainer ask a `RunDir` for a path; nothing else spells out a file name of a run.

    RUN/
      .hydra/config.yaml, overrides.yaml   Hydra: the composed config, the command's overrides
      seqexp.log                           Hydra's log of the run
      events.out.tfevents.*                TensorBoard (the HParams entry ends in .hparams)
      metrics.json                         the run's record: status, best and final metrics (record.py)
      checkpoints/last.pt                  the latest training state: what resume continues from
      checkpoints/best.pt                  the best weights by the monitored metric: what is used
      checkpoints/step_000200.pt           every trainer.checkpoint_every steps, the newest keep_last kept
      job.json                             a sweep's job: the config hash its results belong to
      mlflow.json                          logging.backends=[mlflow]: the MLflow run this run records to (resume continues it)
      .seqexp.lock                         held while a process writes the run (locks.py)
      eval_<split>_<checkpoint>.json       seqexp-evaluate's results
      profile/<worker>.<time>.pt.trace.json  trainer.profile: a few steps' trace (profile.py)

Imports no torch: `resume=` is resolved before torch loads.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

from seqexp.files import read_json, write_json

STEP_FILE = re.compile(r"step_(\d+)\.pt")


class RunDir:
    CHECKPOINTS = "checkpoints"
    LAST, BEST = "last.pt", "best.pt"
    METRICS = "metrics.json"
    HYDRA = ".hydra"
    LOG = "seqexp.log"  # hydra.job.name (configs/train.yaml) + .log
    LOCK = ".seqexp.lock"
    JOB = "job.json"
    MLFLOW = "mlflow.json"
    PROFILE = "profile"
    EVENTS = "events.out.tfevents.*"
    # what a run writes: a directory holding any of these holds a run
    MARKS = (METRICS, CHECKPOINTS, HYDRA)
    # Hydra's own files: a directory holding only these holds no run yet
    HYDRA_FILES = (HYDRA, LOG)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------- files
    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / self.BEST

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def config(self) -> Path:
        return self.path / self.HYDRA / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.path / self.HYDRA / "overrides.yaml"

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def job(self) -> Path:
        return self.path / self.JOB

    @property
    def mlflow(self) -> Path:
        """The MLflow run's id and tracking URI (mlflow_backend.py)."""
        return self.path / self.MLFLOW

    @property
    def profile(self) -> Path:
        """trainer.profile's folder: the trace TensorBoard's profiler plugin and Perfetto read."""
        return self.path / self.PROFILE

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.pt"

    def evaluation(self, split: str, checkpoint: Path) -> Path:
        """Where seqexp-evaluate writes the metrics of `checkpoint` on `split`."""
        return self.path / f"eval_{split}_{Path(checkpoint).stem}.json"

    def events(self) -> list[Path]:
        return sorted(self.path.glob(self.EVENTS))

    # ---------------------------------------------------------------- what is there
    def holds_run(self) -> bool:
        """Anything a run wrote: its record, its checkpoints, or Hydra's config of it."""
        return any((self.path / name).exists() for name in self.MARKS)

    def holds_results(self) -> bool:
        """A record or a checkpoint: what a fresh run here would overwrite (a temporary a killed
        writer left is not one: it is never read)."""
        return self.metrics.exists() or any(not p.name.startswith(".") for p in self.checkpoints.glob("*.pt"))

    def only_hydra_files(self) -> bool:
        """Nothing but what Hydra writes when a command starts, and the lock (no result of any run)."""
        return self.path.is_dir() and all(p.name in (*self.HYDRA_FILES, self.LOCK) for p in self.path.iterdir())

    def read_metrics(self) -> Optional[dict]:
        return read_json(self.metrics)

    def write_metrics(self, record: dict) -> None:
        write_json(self.metrics, record)

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every step checkpoint, oldest first."""
        return sorted((int(m.group(1)), f) for f in self.checkpoints.glob("step_*.pt")
                      if (m := STEP_FILE.fullmatch(f.name)))

    def checkpoint_files(self) -> list[Path]:
        """Every checkpoint of the run: last, best, then the step checkpoints newest first."""
        named = [p for p in (self.last, self.best) if p.is_file()]
        return named + [p for _, p in reversed(self.step_checkpoints())]

    def for_use(self) -> Optional[Path]:
        """The checkpoint a command uses: best.pt (best by the validation objective), else last.pt."""
        return next((p for p in (self.best, self.last) if p.is_file()), None)

    # ---------------------------------------------------------------- changes
    def prune(self, keep: int, upto: int, protect: frozenset[Path] = frozenset()) -> None:
        """Keep the `keep` newest step checkpoints at or before step `upto`, and every protected one.

        Those after `upto` are left alone: a run resumed from an earlier checkpoint overwrites them
        as it reaches their steps, so they are never the ones pruned in their place."""
        found = [(s, f) for s, f in self.step_checkpoints() if s <= upto]
        protect = {Path(p).resolve() for p in protect}
        for _, f in found[: max(len(found) - keep, 0)]:
            if f.resolve() not in protect:
                f.unlink(missing_ok=True)

    def clear_results(self) -> None:
        """Before a sweep's job starts over: no old checkpoint, record or events to mix with the new
        (and a new MLflow run, not the old one continued)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.metrics.unlink(missing_ok=True)
        self.mlflow.unlink(missing_ok=True)
        for f in self.events():
            f.unlink()

    def move_aside(self) -> Path:
        """Rename the directory to `<name>.old-<time>` beside it (never deleted) -> the new path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            target = self.path.with_name(f"{self.path.name}.old-{stamp}" + (f"-{n}" if n else ""))
            if not target.exists():
                self.path.rename(target)
                return target
        raise FileExistsError(f"no free name beside {self.path}")

    # ---------------------------------------------------------------- finding runs
    @classmethod
    def of(cls, checkpoint: str | Path) -> "RunDir":
        """The run a checkpoint belongs to (its checkpoints/ folder's parent, else its own folder)."""
        p = Path(checkpoint)
        return cls(p.parent.parent if p.parent.name == cls.CHECKPOINTS else p.parent)

    @classmethod
    def is_checkpoint_of_a_run(cls, checkpoint: Path) -> bool:
        return Path(checkpoint).parent.name == cls.CHECKPOINTS

    @classmethod
    def latest(cls, outputs: Path) -> Optional[Path]:
        """The last.pt under `outputs` written last, or None."""
        found = sorted(Path(outputs).glob(f"**/{cls.CHECKPOINTS}/{cls.LAST}"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    @classmethod
    def jobs(cls, sweep_dir: Path) -> Iterator["RunDir"]:
        """The job directories of a sweep (where Hydra wrote a job's overrides)."""
        for p in Path(sweep_dir).rglob(f"{cls.HYDRA}/overrides.yaml"):
            yield cls(p.parent.parent)

    @classmethod
    def with_checkpoints(cls, directory: Path) -> list["RunDir"]:
        """The runs directly inside `directory` that have a checkpoints/ folder, by name."""
        return [cls(d) for d in sorted(Path(directory).iterdir()) if d.is_dir() and (d / cls.CHECKPOINTS).is_dir()]
