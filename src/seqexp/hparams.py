"""TensorBoard HParams for one job, written into the job's own run directory.

`SummaryWriter.add_hparams` writes to a new sub-run named by a timestamp, and metrics passed to
it before training ends show up as -1 or blank. Here, when the job has ended, the session start
(its overrides as typed values), a few summary scalars and the session end (finished or failed)
go into the job directory itself, so `tensorboard --logdir SWEEP_DIR` lists one session per job,
named by the job directory, which says its overrides. No experiment summary is written: without
one TensorBoard takes the hparams from every session and the metrics from every scalar tag, so
jobs with other hparams (a later re-run, an Optuna search) still show.

A single run (no `-m`) writes the same entry into its run directory when it ends
(`write_run_hparams`), with every value of its config that shapes the result (`config_hparams`)
as its hparams, so `tensorboard --logdir outputs` compares single runs in the HParams tab too.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")

SUFFIX = ".hparams"  # events file name suffix, so a re-run replaces only this file

STATUS = {"finished": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_FAILURE"}


def hparam_values(cfg: DictConfig, overrides: list[str]) -> dict:
    """The job's overrides as typed values: `optimizer.lr=3e-3` -> 0.003, `model=rnn` -> 'rnn'."""
    values = {}
    for o in overrides:
        key, _, raw = o.partition("=")
        if key.startswith("~"):
            continue
        key = key.lstrip("+")
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or value is None or isinstance(value, (list, tuple)):
            value = raw  # a group choice (model=rnn) or a value TensorBoard cannot type
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)  # enums
        values[key] = value
    return values


NOT_HPARAMS = ("logging", "sweep", "resume", "trainer.progress")  # how a run reports, not what it learns


def config_hparams(cfg: DictConfig) -> dict:
    """A single run's hparams: the model, data, optimizer, scheduler and trainer values, flat
    (`optimizer.lr`: 0.003); a group's `_target_` as its class name (`model`: 'RecurrentModel')."""
    values = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in NOT_HPARAMS:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            elif key == "_target_":
                values[prefix.rstrip(".")] = str(value).rpartition(".")[2]
            elif isinstance(value, (bool, int, float, str)):
                values[name] = value
            elif value is not None:
                values[name] = str(value)  # a list: TensorBoard types only numbers, strings, bools

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return values


def job_metrics(metrics: dict) -> dict[str, float]:
    """Scalars added for the HParams table: the validation metrics at the best step and the
    parameter count. Final values need nothing: the table shows the
    last value of each tag, and `val/*` ends at the final evaluation."""
    # floats only: the ints beside them are counts (val/tokens, tp, ...), not metrics
    out = {f"best/{k}": v for k, v in (metrics.get("best") or {}).items() if isinstance(v, float)}
    # test/* needs nothing either: train() logs it when it evaluates the test split
    if metrics.get("num_params"):
        out["model/num_params"] = metrics["num_params"]
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def write_hparams(run_dir: Path, name: str, hparams: dict, metrics: dict, status: str) -> None:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
    from tensorboard.compat.proto import summary_pb2
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    for old in run_dir.glob(f"{RunDir.EVENTS}{SUFFIX}"):
        old.unlink()  # a re-run (retry, resume) replaces the job's session
    step = int(metrics.get("steps") or 0)
    writer = SummaryWriter(str(run_dir), filename_suffix=SUFFIX)
    try:
        # trial_id = job name: sessions are grouped by it, so jobs never merge into one row
        writer.file_writer.add_summary(summary_v2.hparams_pb(hparams, trial_id=name), step)
        for tag, value in job_metrics(metrics).items():
            writer.add_scalar(tag, value, step)
        end = plugin_data_pb2.SessionEndInfo(
            status=api_pb2.Status.Value(STATUS.get(status, "STATUS_UNKNOWN")), end_time_secs=time.time())
        summary = summary_pb2.Summary()
        summary.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                          metadata=metadata.create_summary_metadata(
                              plugin_data_pb2.HParamsPluginData(session_end_info=end)))
        writer.file_writer.add_summary(summary, step)
    finally:
        writer.close()


def write_run_hparams(cfg: DictConfig, run: RunDir) -> None:
    """TensorBoard HParams for a single run, however it ended: its hyper-parameters (the config's
    values) and the metrics its record holds. Never fails the run."""
    try:
        metrics = run.read_metrics() or {}
        write_hparams(run.path, run.path.name, config_hparams(cfg), metrics, metrics.get("status", ""))
    except Exception as e:  # the run's results matter more than its HParams entry
        log.warning("HParams not written (%s: %s)", type(e).__name__, e)
