"""The logger's MLflow backend (`logging.backends=[mlflow]`): one MLflow run per seqexp run.

- Where: MLFLOW_TRACKING_URI when set (a shared tracking server), else a SQLite store in
  outputs/ (`local_store`). The run's id and tracking URI are kept in the run directory
  (RunDir.mlflow), so a resumed run continues the same MLflow run, at the steps after its
  checkpoint, in the store it started in.
- Params: the composed config, flattened to dot keys (`optimizer.lr`), values cut to MLflow's
  length limit. A resume that changes a value (trainer.max_steps) keeps the param as the run
  started and records the new value as a tag `seqexp.resumed.<key>`: MLflow never changes a param.
- Metrics: the names and steps TensorBoard gets (`train/loss`, `val/acc`; `val/loss@6`, a length
  variant, is `val/loss_at_6`: MLflow refuses `@`), sent in batches when the trainer flushes
  (after each evaluation and its checkpoint), not one request per step.
- Artifacts, when the run ends however it ends: metrics.json, the composed config (config.yaml)
  and, with logging.mlflow.log_checkpoint=true, checkpoints/best.pt. Text (samples, wrong
  examples) goes in as text files per step, pictures as MLflow's step-wise images; histograms are
  left to TensorBoard (MLflow has no histogram type).
- A sweep's job is a child (tag mlflow.parentRunId) of one parent run per sweep directory, found
  by a tag holding a digest of the directory's path, or created under a lock in the sweep
  directory, so that jobs in separate processes find the same parent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import OmegaConf

from seqexp.config import to_container
from seqexp.files import read_json, write_json
from seqexp.hparams import job_metrics
from seqexp.locks import file_lock
from seqexp.logger import Backend
from seqexp.resume import OUTPUTS, flat
from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")

SWEEP_TAG = "seqexp.sweep"  # on a sweep's parent run: a digest of the sweep directory's path
# the record's status -> the MLflow run's; a run stopped by a signal can be resumed: KILLED, not FAILED
STATUS = {"finished": "FINISHED", "preempted": "KILLED", "interrupted": "KILLED"}
NOT_PARAMS = ("resume",)  # how this process was started, not what the run is


def local_store() -> tuple[str, str]:
    """(tracking URI, artifact location) without MLFLOW_TRACKING_URI: SQLite in outputs/, where
    Hydra's run directories go (and `resume=latest` looks). One store there holds every run and
    sweep of the project, as `tensorboard --logdir outputs` shows them all; a store per run
    directory could not hold a sweep's parent beside its children. (MLflow 3 refuses its
    ./mlruns file store.)"""
    outputs = OUTPUTS.resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{outputs / 'mlflow.db'}", (outputs / "mlartifacts").as_uri()


def mlflow_name(name: str) -> str:
    """A metric, param or image name as MLflow takes it: letters, digits, `_ - . / ` and space
    only (the server refuses the whole batch otherwise). `val/loss@6` -> `val/loss_at_6`."""
    return re.sub(r"[^\w.\-/ ]", "_", name.replace("@", "_at_"))


def config_params(config: dict) -> dict[str, str]:
    """{'optimizer.lr': '0.003', ...}: every leaf of a plain config dict, as MLflow params (strings
    within its length limit, names it takes)."""
    return {mlflow_name(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flat(config).items() if k not in NOT_PARAMS}


def chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class MLflow(Backend):
    def __init__(self, cfg, run: RunDir, *, resumed: bool, sweep: Optional[Path] = None):
        self.run, self.settings = run, cfg.logging.mlflow
        self.config = to_container(cfg)
        self.pending: list[Metric] = []
        if os.environ.get("MLFLOW_TRACKING_URI"):
            uri, artifacts = os.environ["MLFLOW_TRACKING_URI"], None  # the server chooses
        else:
            uri, artifacts = local_store()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self.continued(saved_run(run, uri)) if resumed else None
        if self.run_id is None:
            experiment = self.experiment(artifacts)
            tags = {"seqexp.run_dir": str(run.path.resolve())}
            if sweep is not None:
                tags["mlflow.parentRunId"] = sweep_parent(self.client, experiment, Path(sweep))
            self.run_id = self.client.create_run(experiment, tags=tags, run_name=run.path.name).info.run_id
            write_json(run.mlflow, {"run_id": self.run_id, "tracking_uri": uri})
            self.log_params(config_params(self.config))
        log.info("MLflow run %s in %s", self.run_id, uri)

    # ---------------------------------------------------------------- the run
    def experiment(self, artifacts: Optional[str]) -> str:
        name = self.settings.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # created meanwhile by another job of a sweep
            return self.client.get_experiment_by_name(name).experiment_id

    def continued(self, run_id: Optional[str]) -> Optional[str]:
        """A resumed run: its MLflow run, running again, with the params added or changed since."""
        if run_id is None:
            return None
        try:
            old = self.client.get_run(run_id).data.params
        except MlflowException as e:  # deleted, or another server: the resumed part gets a new run
            log.warning("MLflow run %s not found (%s); recording to a new one", run_id, str(e).splitlines()[0])
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.run_id, params = run_id, config_params(self.config)
        self.log_params({k: v for k, v in params.items() if k not in old})
        changed = [RunTag(f"seqexp.resumed.{k}", v[:MAX_TAG_VAL_LENGTH]) for k, v in params.items()
                   if k in old and old[k] != v]
        for part in chunks(changed, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=part)
        return run_id

    def log_params(self, params: dict[str, str]) -> None:
        for part in chunks([Param(k, v) for k, v in params.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=part)

    # ---------------------------------------------------------------- what the logger sends
    def scalars(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(mlflow_name(k), float(v), now, step) for k, v in values.items()]
        if len(self.pending) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:06d}.txt")

    def image(self, tag: str, rgb, step: int) -> None:
        self.client.log_image(self.run_id, rgb, key=mlflow_name(tag), step=step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.client.log_figure(self.run_id, fig, f"{tag}/step_{step:06d}.png")

    def flush(self) -> None:
        # a resume repeats the steps between its checkpoint and a crash that sent them (the
        # trainer flushes after each checkpoint, so only a crash does): MLflow cannot delete points
        for part in chunks(self.pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=part)
        self.pending = []

    def close(self) -> None:
        """The run ends: last metrics, the record's summary metrics and status, the artifacts.
        Never fails the run: its results are on disk whatever the tracking server says."""
        try:
            self.finish()
        except Exception as e:
            log.warning("MLflow run %s not closed (%s: %s)", self.run_id, type(e).__name__, str(e).splitlines()[0])

    def finish(self) -> None:
        self.flush()
        record = self.run.read_metrics() or {}
        summary = job_metrics(record)  # best/<metric> at the best step, model/num_params: as TensorBoard's HParams
        if summary:
            self.scalars(summary, int(record.get("steps") or 0))
            self.flush()
        if record:
            self.client.log_artifact(self.run_id, str(self.run.metrics))
        self.client.log_text(self.run_id, OmegaConf.to_yaml(self.config), "config.yaml")
        if self.settings.log_checkpoint and self.run.best.is_file():
            self.client.log_artifact(self.run_id, str(self.run.best), "checkpoints")
        status = STATUS.get(record.get("status"), RunStatus.to_string(RunStatus.FAILED))
        self.client.set_terminated(self.run_id, status)


def saved_run(run: RunDir, uri: str) -> Optional[str]:
    """The MLflow run id a resumed run recorded to, if it recorded to the store this process uses.
    The store itself is never read from the run directory: a crafted mlflow.json must not point
    a resume at a database or server of its choosing (nothing read from a run directory writes
    outside it, README "Trust"), so a run resumed against another store starts a new MLflow run."""
    saved = read_json(run.mlflow)
    if not isinstance(saved, dict):
        return None
    run_id = saved.get("run_id")
    if not (isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id)):
        log.warning("%s holds no MLflow run id; recording to a new MLflow run", run.mlflow)
        return None
    if saved.get("tracking_uri") != uri:
        log.warning("MLflow run %s was recorded in %s, not in %s (MLFLOW_TRACKING_URI); recording to a "
                    "new MLflow run there", run_id, saved.get("tracking_uri"), uri)
        return None
    return run_id


def sweep_parent(client: MlflowClient, experiment: str, sweep: Path) -> str:
    """The sweep's parent run: the one tagged with its directory's digest, else a new one. Under
    a lock in the sweep directory: of jobs that start at once, in any process, one creates it."""
    sweep = Path(sweep).resolve()
    digest = hashlib.sha1(str(sweep).encode()).hexdigest()
    with file_lock(sweep / ".locks" / "mlflow-parent.lock"):
        found = client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = '{digest}'", max_results=1)
        if found:
            return found[0].info.run_id
        # named by the directory's last two parts (outputs/multirun/<date>/<time>: date/time)
        parent = client.create_run(experiment, run_name="/".join(sweep.parts[-2:]),
                                   tags={SWEEP_TAG: digest, "seqexp.sweep_dir": str(sweep)})
        # a sweep's jobs end in any order, in any process: the parent records no end of its own
        client.set_terminated(parent.info.run_id, "FINISHED")
        return parent.info.run_id
