"""logging.backends=[mlflow] against a real MLflow tracking server (tests/mlflow_server.py: one
for the session, SQLite behind it): a run, a resumed run and a two-job sweep are read back through
MLflow's client -- params, metric histories and their steps, artifacts, parent and child runs --
and compared with what the run wrote itself (metrics.json, TensorBoard's events)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqexp.config import to_container
from seqexp.errors import UserError
from seqexp.train import train
from tests.helpers import ROOT, make_cfg, scalars, tiny_overrides

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(scope="session")
def tracking_uri(request) -> str:
    from tests.mlflow_server import shared_server

    return shared_server(request.config)


@pytest.fixture
def client(tracking_uri, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # where the runs of a test record
    return MlflowClient(tracking_uri)


def run_id(run: Path) -> str:
    return json.loads((run / "mlflow.json").read_text())["run_id"]


def history(client: MlflowClient, rid: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.step)]


def artifact(rid: str, path: str, dst: Path) -> Path:
    """A run's file, downloaded through the server (from MLFLOW_TRACKING_URI: the `client` fixture's)."""
    return Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path, dst_path=str(dst)))


def test_a_run_records_its_config_metrics_and_files(client, tiny_text, tmp_path):
    cfg = make_cfg(*tiny_overrides("gru", tiny_text, "logging.backends=[tensorboard,mlflow]",
                                   "logging.mlflow.log_checkpoint=true", "logging.sample.chars=20"))
    run = tmp_path / "run"
    record = train(cfg, run)
    rid = run_id(run)
    got = client.get_run(rid)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert "mlflow.parentRunId" not in got.data.tags  # a single run has no parent

    # params: every leaf of the composed config, dot keys, as strings
    params = got.data.params
    config = to_container(cfg)
    assert params["optimizer.lr"] == str(config["optimizer"]["lr"])
    assert params["model.hidden_size"] == "32" and params["trainer.max_steps"] == "12"
    assert params["logging.backends"] == "['tensorboard', 'mlflow']"
    assert "resume" not in params

    # metrics: the names, steps and values TensorBoard got
    for key in ("train/loss", "train/lr", "val/loss", "val/bpc", "time/train_s"):
        tb = scalars(run, key)
        assert [s for s, _ in history(client, rid, key)] == [s for s, _ in tb] != [], key
        assert [v for _, v in history(client, rid, key)] == pytest.approx([v for _, v in tb], rel=1e-6), key
    assert [s for s, _ in history(client, rid, "val/loss")] == [6, 12]
    assert history(client, rid, "best/val/loss") == [(12, pytest.approx(record["objective"]["best"]))]

    # files: the record, the config, the best checkpoint (asked for), a text sample per evaluation
    files = {a.path for a in client.list_artifacts(rid)}
    assert {"metrics.json", "config.yaml", "checkpoints", "samples"} <= files
    assert json.loads(artifact(rid, "metrics.json", tmp_path / "a").read_text()) == \
        json.loads((run / "metrics.json").read_text())
    assert yaml.safe_load(artifact(rid, "config.yaml", tmp_path / "b").read_text()) == config
    assert artifact(rid, "checkpoints/best.pt", tmp_path / "c").read_bytes() == \
        (run / "checkpoints" / "best.pt").read_bytes()
    assert [a.path for a in client.list_artifacts(rid, "samples")] == ["samples/step_000006.txt",
                                                                       "samples/step_000012.txt"]


def test_a_resumed_run_continues_its_mlflow_run(client, cli, tiny_text, tmp_path):
    overrides = tiny_overrides("rnn", tiny_text, "logging.backends=[mlflow]")
    run = tmp_path / "run"
    train(make_cfg(*overrides, "trainer.max_steps=6"), run)  # as if stopped after step 6
    rid = run_id(run)
    assert client.get_run(rid).info.status == "FINISHED"
    assert not list(run.glob("events.out.tfevents.*"))  # TensorBoard was not listed

    cli(f"resume={run}", "trainer.max_steps=12")  # the command a person types: the saved config, longer
    assert run_id(run) == rid  # the same MLflow run, not a second one
    got = client.get_run(rid)
    assert got.info.status == "FINISHED"
    assert [s for s, _ in history(client, rid, "train/loss")] == [3, 6, 9, 12]  # each step once
    assert [s for s, _ in history(client, rid, "val/loss")] == [6, 12]
    # a param keeps the value the run started with; the resume's change is a tag
    assert got.data.params["trainer.max_steps"] == "6"
    assert got.data.tags["seqexp.resumed.trainer.max_steps"] == "12"
    assert "checkpoints" not in {a.path for a in client.list_artifacts(rid)}  # log_checkpoint: off by default
    assert len(client.search_runs([got.info.experiment_id], f"tags.`seqexp.run_dir` = '{run.resolve()}'")) == 1


def test_a_crafted_mlflow_json_cannot_point_a_resume_at_another_store(client, cli, tiny_text, tmp_path):
    """The store comes from MLFLOW_TRACKING_URI (or outputs/), never from the run directory: a
    resume of a run whose mlflow.json names another database writes nothing there, and records
    to a new run in the store in use."""
    overrides = tiny_overrides("rnn", tiny_text, "logging.backends=[mlflow]")
    run = tmp_path / "run"
    train(make_cfg(*overrides, "trainer.max_steps=6"), run)
    rid = run_id(run)
    elsewhere = tmp_path / "elsewhere" / "evil.db"
    (run / "mlflow.json").write_text(json.dumps({"run_id": rid, "tracking_uri": f"sqlite:///{elsewhere}"}))
    cli(f"resume={run}", "trainer.max_steps=12")
    assert not elsewhere.parent.exists()
    assert run_id(run) != rid  # a new MLflow run in the server of MLFLOW_TRACKING_URI
    assert [s for s, _ in history(client, run_id(run), "train/loss")] == [9, 12]


@pytest.mark.slow  # a real multirun in its own process, as tests/test_sweep.py
def test_a_sweep_is_one_parent_run_with_a_child_per_job(client, tracking_uri, tiny_text, tmp_path):
    sweep = tmp_path / "sweep"
    experiment = "sweep-test"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "model=rnn", "optimizer.lr=1e-3,3e-3",
           *[o for o in tiny_overrides("rnn", tiny_text, "trainer.max_steps=4", "trainer.eval_every=2")
             if not o.startswith("model=")],
           "logging.backends=[mlflow]", f"logging.mlflow.experiment={experiment}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking_uri}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id])
    children = {run.info.run_name: run for run in found if "mlflow.parentRunId" in run.data.tags}
    parents = [run for run in found if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["seqexp.sweep_dir"] == str(sweep.resolve())
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert sorted(children) == jobs and len(jobs) == 2
    for name, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.run_id == run_id(sweep / name)
        assert child.info.status == "FINISHED"
        assert [s for s, _ in history(client, child.info.run_id, "val/loss")] == [2, 4]
    assert {c.data.params["optimizer.lr"] for c in children.values()} == {"0.001", "0.003"}

    # a job started later into the same sweep directory (a re-run) finds the same parent
    from seqexp.mlflow_backend import sweep_parent

    assert sweep_parent(client, exp.experiment_id, sweep) == parents[0].info.run_id


def test_names_mlflow_refuses_are_mapped_once():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, validate_param_and_metric_name

    from seqexp.mlflow_backend import config_params, mlflow_name

    names = ["train/loss", "val/acc", "val/loss@6", "weights/layers.0.weight_ih", "a%b,c"]
    mapped = [mlflow_name(n) for n in names]
    assert mapped[:4] == ["train/loss", "val/acc", "val/loss_at_6", "weights/layers.0.weight_ih"]
    assert all(validate_param_and_metric_name(n) for n in mapped) and len(set(mapped)) == len(names)
    long = "p" * (MAX_PARAM_VAL_LENGTH + 1)
    params = config_params({"model": {"_target_": "x.Y", "sizes": [1, 2]}, "data": {"path": long}, "resume": "r"})
    assert params == {"model._target_": "x.Y", "model.sizes": "[1, 2]", "data.path": long[:-1]}  # cut to the limit


def test_mlflow_without_its_package_is_refused_naming_the_extra(cli, tiny_text, tmp_path, monkeypatch, capsys):
    from seqexp.config import validate

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: `import mlflow` raises ImportError
    message = "logging.backends=[mlflow] needs MLflow: pip install 'seqexp[mlflow]'"
    with pytest.raises(UserError, match=__import__("re").escape(message)):
        validate(make_cfg(*tiny_overrides("rnn", tiny_text, "logging.backends=[tensorboard,mlflow]")))
    validate(make_cfg(*tiny_overrides("rnn", tiny_text)))  # TensorBoard alone needs nothing more

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli(*tiny_overrides("rnn", tiny_text, "logging.backends=[mlflow]"), f"hydra.run.dir={run}")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    assert not run.exists()  # refused before anything was written
