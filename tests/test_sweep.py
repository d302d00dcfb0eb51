"""Sweeps end to end: real multiruns of tiny jobs (basic and joblib launchers, Optuna), failed and
re-run jobs, real signals that interrupt a sweep, the summary, and the HParams entries read back by
a real TensorBoard server."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from seqexp.config import safe_dirname
from seqexp.sweep import resources
from seqexp.sweep.summary import write_summary
from tests.helpers import ROOT, make_cfg, tiny_overrides

# The tiny settings as an experiment file: `experiment` is left out of job directory names, so
# jobs are named by what the sweep varies (`0_model=rnn,optimizer.lr=0.001`).
TINY = """# @package _global_
model: {{hidden_size: 16, embed_dim: 8}}
data: {{path: {text}, batch_size: 4, seq_len: 16}}
trainer: {{max_steps: 8, eval_every: 4, checkpoint_every: 4, log_every: 2, progress: false, device: cpu}}
scheduler: {{warmup_steps: 2}}
logging: {{sample: {{chars: 0}}, gradient_distance: {{enabled: false}}}}  # no report is tested here
"""
# Jobs that are still training when a test signals them: last.pt every 5 steps, and hundreds of
# steps (about 3 ms each) after it. A re-run finishes them with the same config.
LONG = TINY.replace("max_steps: 8, eval_every: 4, checkpoint_every: 4, log_every: 2",
                    "max_steps: 600, eval_every: 300, checkpoint_every: 5, log_every: 100")
MISSING = "/nonexistent/corpus.txt"


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def conf_dir(tmp_path_factory, tiny_text) -> Path:
    d = tmp_path_factory.mktemp("conf")
    (d / "experiment").mkdir()
    (d / "experiment" / "tiny.yaml").write_text(TINY.format(text=tiny_text))
    (d / "experiment" / "long.yaml").write_text(LONG.format(text=tiny_text))
    return d


def multirun_command(conf_dir: Path, sweep_dir: Path, *overrides: str, experiment: str = "tiny") -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *overrides, f"experiment={experiment}",
            f"hydra.searchpath=[file://{conf_dir}]", f"hydra.sweep.dir={sweep_dir}"]


# one thread: for jobs this small, more only spin-wait for cores other processes hold
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def multirun(conf_dir: Path, sweep_dir: Path, *overrides: str, experiment: str = "tiny") -> subprocess.CompletedProcess:
    return subprocess.run(multirun_command(conf_dir, sweep_dir, *overrides, experiment=experiment),
                          capture_output=True, text=True, cwd=sweep_dir.parent, timeout=300, env=ENV)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("_")[0]))


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def hparams_of(job: Path) -> tuple[dict, int]:
    """The session's hparams and end status, as TensorBoard reads them from the job's events."""
    acc = EventAccumulator(str(job)).Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    return values, end.status


def check_summary(sweep_dir: Path, jobs: list[Path]) -> list[dict]:
    rows = summary_rows(sweep_dir)
    assert sorted(r["job"] for r in rows) == sorted(j.name for j in jobs)
    best = [float(r["best val/loss"]) for r in rows if r["status"] == "finished"]
    assert best == sorted(best)  # sorted by the objective, lower first
    for r in rows:
        m = metrics(sweep_dir / r["job"])
        assert r["status"] == m["status"]
        if m["status"] == "finished":
            assert float(r["best val/loss"]) == pytest.approx(m["objective"]["best"])
            assert float(r["final val/loss"]) == pytest.approx(m["final"]["val/loss"])
            assert int(r["steps"]) == 8 and int(r["num_params"]) == m["num_params"]
    md = (sweep_dir / "summary.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == len(jobs) + 1  # header + rows
    for png in ("val_curves.png", "objective_vs_params.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    return rows


# ----------------------------------------------------------------------------- basic launcher
@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def basic_sweep(conf_dir, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("basic") / "sweep"
    r = multirun(conf_dir, sweep, "model=rnn,gru", "optimizer.lr=1e-3,3e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_basic_sweep_gives_each_job_a_directory_a_row_and_hparams(basic_sweep):
    jobs = job_dirs(basic_sweep)
    assert [j.name for j in jobs] == ["0_model=rnn,optimizer.lr=0.001", "1_model=rnn,optimizer.lr=0.003",
                                      "2_model=gru,optimizer.lr=0.001", "3_model=gru,optimizer.lr=0.003"]
    check_summary(basic_sweep, jobs)
    for job in jobs:
        m = metrics(job)
        assert m["status"] == "finished" and m["steps"] == 8
        values, status = hparams_of(job)
        model, lr = job.name.split("_", 1)[1].split(",")
        assert values == {"model": model.split("=")[1], "optimizer.lr": float(lr.split("=")[1]),
                          "experiment": "tiny"}
        assert status == api_pb2.STATUS_SUCCESS
        best = EventAccumulator(str(job)).Reload().Scalars("best/val/loss")
        assert [(e.step, e.value) for e in best] == [(8, pytest.approx(m["objective"]["best"], rel=1e-6))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_tensorboard_serves_every_jobs_scalars_and_hparams(basic_sweep, tmp_path):
    exe = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    jobs = {j.name: metrics(j) for j in job_dirs(basic_sweep)}
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen([*cmd, "--logdir", str(basic_sweep), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        groups, deadline = [], time.monotonic() + 90
        while time.monotonic() < deadline:  # until every job's session has its metrics
            try:
                groups = http(f"{base}/data/plugin/hparams/session_groups", {
                    "experimentName": "", "startIndex": 0, "sliceSize": 100, "allowedStatuses": [
                        "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})["sessionGroups"]
                if len(groups) == len(jobs) and all(g["metricValues"] for g in groups):
                    break
            except OSError:  # not listening yet
                pass
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
            time.sleep(1)
        assert {g["name"] for g in groups} == set(jobs)

        tags = http(f"{base}/data/plugin/scalars/tags")
        for name, m in jobs.items():
            assert {"val/loss", "train/loss", "best/val/loss"} <= set(tags[name])
            q = urllib.parse.urlencode({"run": name, "tag": "val/loss"})
            series = http(f"{base}/data/plugin/scalars/scalars?{q}")
            assert [p[1] for p in series] == [4, 8]  # [wall_time, step, value]
            assert series[-1][2] == pytest.approx(m["final"]["val/loss"], rel=1e-6)

        for g in groups:
            m = jobs[g["name"]]
            assert g["hparams"]["model"] in ("rnn", "gru") and g["hparams"]["optimizer.lr"] in (0.001, 0.003)
            assert g["sessions"][0]["status"] == "STATUS_SUCCESS"
            values = {v["name"]["tag"]: v["value"] for v in g["metricValues"]}
            assert values["best/val/loss"] == pytest.approx(m["objective"]["best"], rel=1e-6)
            assert values["val/loss"] == pytest.approx(m["final"]["val/loss"], rel=1e-6)
            assert values["model/num_params"] == m["num_params"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_continues_an_unfinished_one(basic_sweep, conf_dir):
    jobs = job_dirs(basic_sweep)
    before = {j.name: (j / "metrics.json").stat().st_mtime_ns for j in jobs}
    unfinished = jobs[1]  # as if the sweep had been killed during this job
    m = metrics(unfinished)
    m["status"] = "running"
    (unfinished / "metrics.json").write_text(json.dumps(m))

    r = multirun(conf_dir, basic_sweep, "model=rnn,gru", "optimizer.lr=1e-3,3e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for job in jobs:
        skipped = f"{job.name}: finished in an earlier run of this sweep; skipped" in out
        assert skipped == (job != unfinished), job.name
        if job != unfinished:
            assert (job / "metrics.json").stat().st_mtime_ns == before[job.name]
    assert metrics(unfinished)["status"] == "finished" and metrics(unfinished)["steps"] == 8
    assert f"{unfinished.name}: continuing from checkpoints/last.pt" in out  # resumed, not started over
    # the job's events hold each evaluation once
    steps = [e.step for e in EventAccumulator(str(unfinished)).Reload().Scalars("val/loss")]
    assert steps == [4, 8]
    assert len(summary_rows(basic_sweep)) == 4


# ----------------------------------------------------------------------------- joblib, failures
@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def joblib_sweep(conf_dir, tiny_text, tmp_path_factory):
    """2 x 2 on two worker processes; one data.path does not exist, so two jobs fail."""
    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    r = multirun(conf_dir, sweep, f"data.path={tiny_text},{MISSING}", "optimizer.lr=1e-3,3e-3",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert r.returncode == 2, r.stderr[-3000:]  # jobs failed: non-zero, after the summary
    assert "error: 2 of 4 jobs failed: " in r.stderr and (sweep / "summary.csv").is_file()
    return sweep


@pytest.mark.slow
def test_joblib_sweep_records_failed_jobs_and_runs_the_others(joblib_sweep):
    jobs = job_dirs(joblib_sweep)
    assert len(jobs) == 4  # `/` in data.path did not nest directories
    rows = {r["job"]: r for r in check_summary(joblib_sweep, jobs)}
    for job in jobs:
        m = metrics(job)
        failed = "_nonexistent_corpus.txt" in job.name
        assert m["status"] == ("failed" if failed else "finished")
        assert rows[job.name]["status"] == m["status"]
        _, status = hparams_of(job)
        assert status == (api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS)
        if failed:
            assert MISSING in m["error"] and MISSING in rows[job.name]["error"]
        res = json.loads((job / "job.json").read_text())["resources"]
        assert res["parallel_jobs"] == 2
        assert res["threads"] == max(1, resources.available_cores() // 2)
    assert [r["status"] for r in summary_rows(joblib_sweep)][-2:] == ["failed", "failed"]  # no objective: last


@pytest.mark.slow
def test_rerun_retries_failed_jobs_only(joblib_sweep, conf_dir, tiny_text):
    r = multirun(conf_dir, joblib_sweep, f"data.path={tiny_text},{MISSING}", "optimizer.lr=1e-3,3e-3")
    assert r.returncode == 2, r.stderr[-3000:]  # they failed again
    out = r.stdout + r.stderr
    assert out.count("finished in an earlier run of this sweep; skipped") == 2
    assert out.count(f"no such file: {MISSING}") >= 2  # tried again, failed again
    assert [r["status"] for r in summary_rows(joblib_sweep)] == ["finished", "finished", "failed", "failed"]


@pytest.mark.slow
def test_fail_fast_stops_the_sweep_at_the_first_failure(conf_dir, tiny_text, tmp_path):
    sweep = tmp_path / "sweep"
    r = multirun(conf_dir, sweep, "model=rnn", f"data.path={MISSING},{tiny_text}", "sweep.fail_fast=true")
    assert r.returncode == 2
    assert "sweep stopped (sweep.fail_fast=true)" in r.stderr
    assert [j.name for j in job_dirs(sweep)] == ["0_data.path=_nonexistent_corpus.txt,model=rnn"]
    assert [r["status"] for r in summary_rows(sweep)] == ["failed"]  # the summary is written first


def test_a_job_failing_mid_training_keeps_its_last_evaluation(tiny_text, tmp_path, monkeypatch):
    from seqexp.sweep.job import run_sweep_job
    from tests.helpers import poison_loss_at

    def hydra_cfg(name, overrides):
        return OmegaConf.create({"runtime": {"output_dir": str(tmp_path / name)}, "sweep": {"dir": str(tmp_path)},
                                 "overrides": {"task": overrides}, "job": {"num": 0}, "launcher": {}})

    poison_loss_at(monkeypatch, {8})  # evaluated at step 6, non-finite at step 8
    assert run_sweep_job(make_cfg(*tiny_overrides("lstm", tiny_text)), hydra_cfg("0_a", ["model=lstm"])) is None
    m = metrics(tmp_path / "0_a")
    assert m["status"] == "failed" and "non-finite values at step 8" in m["error"]
    assert m["steps"] == 6 and m["final"]["val/loss"] > 0  # what the trainer wrote at its last evaluation
    assert hparams_of(tmp_path / "0_a") == ({"model": "lstm"}, api_pb2.STATUS_FAILURE)

    bad = make_cfg(*tiny_overrides("attention", tiny_text, "model.n_heads=3", "sweep.fail_fast=true"))
    with pytest.raises(SystemExit) as e:
        run_sweep_job(bad, hydra_cfg("1_b", ["model.n_heads=3"]))
    assert e.value.code == 2
    assert "divisible" in metrics(tmp_path / "1_b")["error"]


def test_a_sweep_job_keeps_its_text_samples_in_tensorboard_and_prints_none(tiny_text, tmp_path, capsys):
    """A single run prints a sample at its end (test_train.py); a sweep's jobs would print one each."""
    from seqexp.sweep.job import run_sweep_job

    job = tmp_path / "0_model=rnn"
    hydra_cfg = OmegaConf.create({"runtime": {"output_dir": str(job)}, "sweep": {"dir": str(tmp_path)},
                                  "overrides": {"task": ["model=rnn"]}, "job": {"num": 0}, "launcher": {}})
    assert run_sweep_job(make_cfg(*tiny_overrides("rnn", tiny_text, "logging.sample.chars=20")), hydra_cfg) > 0
    assert "sample" not in capsys.readouterr().out
    samples = EventAccumulator(str(job)).Reload().Tensors("samples/text_summary")
    assert [e.step for e in samples] == [6, 12]  # one per evaluation, the last one on the final weights


# ----------------------------------------------------------------------------- interrupts
def start_multirun(conf_dir: Path, sweep_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    """A sweep in the background; its output goes to files (a full pipe would stall it)."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    out = open(sweep_dir.parent / "sweep.out", "w")
    err = open(sweep_dir.parent / "sweep.err", "w")
    with out, err:
        return subprocess.Popen(multirun_command(conf_dir, sweep_dir, *overrides, experiment="long"),
                                cwd=sweep_dir.parent, env=ENV, stdout=out, stderr=err, text=True, **popen)


def wait_for_checkpoints(proc: subprocess.Popen, jobs: list[Path], timeout: float = 120) -> None:
    """Until every job in `jobs` has written checkpoints/last.pt: they are training."""
    deadline = time.monotonic() + timeout
    while not all((j / "checkpoints" / "last.pt").exists() for j in jobs):
        assert proc.poll() is None, f"exited with {proc.returncode} first"
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoints in {jobs} after {timeout} s")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, sweep_dir: Path) -> str:
    """Its stderr, once it has exited (its whole process group is killed if it does not)."""
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return (sweep_dir.parent / "sweep.err").read_text()


def check_interrupted(sweep_dir: Path, jobs: list[Path], err: str) -> None:
    """Each job saved last.pt at the step it stopped after, and is `interrupted` in its metrics.json,
    its HParams entry, the summary and the sweep's last words; no other job directory exists."""
    from seqexp.checkpoint import read as read_checkpoint

    assert job_dirs(sweep_dir) == jobs
    rows = {r["job"]: r for r in summary_rows(sweep_dir)}
    assert set(rows) == {j.name for j in jobs}
    for job in jobs:
        m = metrics(job)
        assert m["status"] == "interrupted" and rows[job.name]["status"] == "interrupted"
        assert read_checkpoint(job / "checkpoints" / "last.pt")["trainer"]["step"] == m["steps"] < 100000
        assert f"after step {m['steps']}" in m["error"]
        assert hparams_of(job)[1] == api_pb2.STATUS_FAILURE
        assert job.name in err.splitlines()[-1]
    assert err.splitlines()[-1].startswith("stopped: ") and f"hydra.sweep.dir={sweep_dir}" in err
    assert "Traceback" not in err
    assert f"({len(jobs)} interrupted)" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_after_saving_and_a_rerun_continues_it(conf_dir, tmp_path):
    sweep = tmp_path / "sweep"
    # a terminal's Ctrl-C: SIGINT to every process of the foreground process group
    proc = start_multirun(conf_dir, sweep, "model=rnn,gru", start_new_session=True)
    first = sweep / "0_model=rnn"
    wait_for_checkpoints(proc, [first])
    os.killpg(proc.pid, signal.SIGINT)
    err = finish(proc, sweep)
    assert proc.returncode == 75, err[-3000:]
    check_interrupted(sweep, [first], err)  # and job 1 never started
    assert "SIGINT, after step" in metrics(first)["error"]

    r = multirun(conf_dir, sweep, "model=rnn,gru", experiment="long")  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{first.name}: continuing from checkpoints/last.pt" in r.stdout + r.stderr
    for job in job_dirs(sweep):
        assert metrics(job)["status"] == "finished" and metrics(job)["steps"] == 600
    steps = [e.step for e in EventAccumulator(str(first)).Reload().Scalars("val/loss")]
    assert steps == [300, 600]  # each evaluation once
    assert [r["status"] for r in summary_rows(sweep)] == ["finished", "finished"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-to-sweep", "ctrl-c"])
def test_a_signal_stops_a_joblib_sweep_in_its_workers(conf_dir, tmp_path, how):
    """SIGTERM to the sweep process alone reaches the workers through it (preempt.FORWARD); Ctrl-C
    reaches them directly as well, and still counts once. The third job never starts."""
    sweep = tmp_path / "sweep"
    proc = start_multirun(conf_dir, sweep, "model=rnn,gru,lstm", "trainer.max_steps=100000",
                          "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", start_new_session=True)
    jobs = [sweep / "0_model=rnn,trainer.max_steps=100000", sweep / "1_model=gru,trainer.max_steps=100000"]
    wait_for_checkpoints(proc, jobs)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    err = finish(proc, sweep)
    assert proc.returncode == 75, err[-3000:]
    check_interrupted(sweep, jobs, err)  # "after step N": one stop (a second signal: KeyboardInterrupt)
    for job in jobs:  # the signal the sweep process got, also where it came forwarded
        assert metrics(job)["error"].startswith("SIGINT, " if how == "ctrl-c" else "SIGTERM, ")


def test_a_job_that_starts_after_the_sweep_was_stopped_does_not_run(tiny_text, tmp_path):
    """As a joblib worker that was still starting when the stop was forwarded: the sweep process's
    stop file keeps it from running, and the directory Hydra made for it goes."""
    from seqexp.sweep.callback import STOP_FILE
    from seqexp.sweep.job import run_sweep_job

    (tmp_path / STOP_FILE).write_text("SIGTERM\n")
    job = tmp_path / "2_model=lstm"
    (job / ".hydra").mkdir(parents=True)
    (job / "seqexp.log").touch()
    hydra_cfg = OmegaConf.create({"runtime": {"output_dir": str(job)}, "sweep": {"dir": str(tmp_path)},
                                  "overrides": {"task": ["model=lstm"]}, "job": {"num": 2}, "launcher": {}})
    assert run_sweep_job(make_cfg(*tiny_overrides("lstm", tiny_text)), hydra_cfg) is None
    assert not job.exists()


# ----------------------------------------------------------------------------- Optuna
@pytest.mark.slow
def test_optuna_search_of_three_trials_reports_its_best(conf_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = multirun(conf_dir, sweep, "hparams_search=char_optuna", "hydra.sweeper.n_trials=3",
                 "model.hidden_size=choice(8,16)")  # replaces the config's (bigger) sizes
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    objective = {}
    for job in jobs:
        m = metrics(job)
        assert m["status"] == "finished"
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert cfg.model.hidden_size in (8, 16) and cfg.model.num_layers in (1, 2)
        assert 3e-4 <= cfg.optimizer.lr <= 1e-2 and 0.0 <= cfg.model.dropout <= 0.3
        objective[int(job.name.split("_")[0])] = m["objective"]["best"]
    result = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert result["direction"] == "minimize"  # val/loss
    assert result["best_trial"] == min(objective, key=objective.get)
    assert result["best_value"] == pytest.approx(min(objective.values()))
    assert set(result["best_params"]) == {"model.hidden_size", "model.num_layers", "optimizer.lr", "model.dropout"}
    assert f"Best trial #{result['best_trial']} of 3" in r.stderr + r.stdout
    assert len(summary_rows(sweep)) == 3

    # the seeded search asks for the same trials again: each meets its finished job
    r = multirun(conf_dir, sweep, "hparams_search=char_optuna", "hydra.sweeper.n_trials=3",
                 "model.hidden_size=choice(8,16)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("finished in an earlier run of this sweep; skipped") == 3
    assert OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml")) == result


def test_optuna_search_space_from_override_grammar():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.seqexp_optuna_sweeper.optuna_sweeper import to_distribution

    parse = lambda s: to_distribution(OverridesParser.create().parse_overrides([s])[0])  # noqa: E731
    assert parse("a=choice(rnn,lstm)") == CategoricalDistribution(["rnn", "lstm"])
    assert parse("a=range(1,5)") == IntDistribution(1, 4)  # the stop value is excluded, as in Python
    assert parse("a=range(16,65,16)") == IntDistribution(16, 64, step=16)
    assert parse("a=interval(0,0.3)") == FloatDistribution(0.0, 0.3)
    assert parse("a=tag(log,interval(1e-4,1e-2))") == FloatDistribution(1e-4, 1e-2, log=True)
    assert parse("a=int(interval(1,8))") == IntDistribution(1, 8)


# ----------------------------------------------------------------------------- units
def test_two_sweeps_started_in_the_same_second_get_different_directories():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from seqexp.configs import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        a, b = (compose("train", return_hydra_config=True).hydra.sweep.dir for _ in range(2))
    assert a != b  # microseconds in the name
    GlobalHydra.instance().clear()


def test_each_parallel_worker_claims_its_own_gpu(tmp_path):
    first = resources.claim_gpu(tmp_path, ["0", "1"], job_num=0)
    second = resources.claim_gpu(tmp_path, ["0", "1"], job_num=1)
    assert (first[0], second[0]) == ("0", "1")
    third = resources.claim_gpu(tmp_path, ["0", "1"], job_num=5)  # more workers than GPUs: share
    assert third == ("1", None)
    first[1].close()  # a worker exits: its GPU is free again
    assert resources.claim_gpu(tmp_path, ["0", "1"], job_num=2)[0] == "0"


def test_configure_job_sets_threads_and_cuda_visible_devices(tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(resources, "available_cores", lambda: 8)
    monkeypatch.setattr(resources, "visible_gpus", lambda: ["4", "7"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    monkeypatch.setattr(resources, "_claimed", None)
    try:
        chosen = resources.configure_job(2, 0, tmp_path, "auto")
        assert chosen == {"parallel_jobs": 2, "gpu": "4", "threads": 4}  # 8 cores / 2 jobs
        assert torch.get_num_threads() == 4
        held = resources._claimed
        assert resources.configure_job(2, 2, tmp_path, "auto")["gpu"] == "4"  # same worker keeps its GPU
        monkeypatch.setattr(resources, "_claimed", None)  # as a second worker process
        assert resources.configure_job(2, 1, tmp_path, "auto")["gpu"] == "7"
        # one job at a time (basic launcher): threads and devices as torch chose them
        one = resources.configure_job(1, 0, tmp_path, "auto")
        assert one == {"parallel_jobs": 1, "threads": chosen["threads"]}
        held[1].close()
        resources._claimed[1].close()
        monkeypatch.setattr(resources, "_claimed", None)
        assert "gpu" not in resources.configure_job(2, 0, tmp_path, "cpu")
    finally:
        torch.set_num_threads(threads)


def test_safe_dirname_never_nests_and_fits_a_filesystem_name():
    assert safe_dirname("data.path=/a/b.txt,model=rnn") == "data.path=_a_b.txt,model=rnn"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(safe_dirname(long_a).encode()) <= 200
    assert safe_dirname(long_a) != safe_dirname(long_b)


def test_summary_handles_test_metrics_running_jobs_and_maximised_objectives(tmp_path):
    def job(name, overrides, metrics=None):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(overrides), tmp_path / name / ".hydra" / "overrides.yaml")
        if metrics is not None:
            (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))

    def done(acc, test):
        return {"status": "finished", "objective": {"metric": "val/acc", "mode": "max", "best": acc},
                "final": {"val/acc": acc - 0.01}, "test": test, "steps": 10, "num_params": 5,
                "timing": {"wall_time_s": 1.5}}

    job("0_model=rnn", ["model=rnn"], done(0.70, {"test/acc": 0.69, "test/loss": 0.6, "confusion": [[1]]}))
    job("1_model=lstm", ["model=lstm"], done(0.80, {"acc": 0.79}))
    job("2_model=gru", ["model=gru"])  # started, no evaluation yet
    job("3_model=attention", ["model=attention"], {"status": "failed", "error": "model.n_heads: bad | value"})
    written = write_summary(tmp_path)
    assert set(written) == {"csv", "md", "params"}  # no events yet: no curves to draw
    rows = summary_rows(tmp_path)
    assert [r["job"] for r in rows] == ["1_model=lstm", "0_model=rnn", "2_model=gru", "3_model=attention"]
    assert [r["status"] for r in rows] == ["finished", "finished", "running", "failed"]
    assert rows[0]["test/acc"] == "0.79" and rows[1]["test/loss"] == "0.6" and rows[2]["test/acc"] == ""
    assert rows[0]["model"] == "lstm" and rows[0]["final val/acc"] == str(0.80 - 0.01)
    md = (tmp_path / "summary.md").read_text()
    assert "higher is better" in md and "bad \\| value" in md
    header = next(line for line in md.splitlines() if line.startswith("| #"))
    assert "| model |" in header and "overrides" not in header  # what varies, not the shared values
    assert math.isclose(float(rows[1]["best val/acc"]), 0.70)


def test_summary_groups_jobs_that_differ_only_in_the_seed(tmp_path):
    """-m model=lstm,gru trainer.seed=1,2,3: mean, standard deviation and count per model."""
    accs = {("lstm", 1): 0.80, ("lstm", 2): 0.84, ("lstm", 3): 0.82, ("gru", 1): 0.70, ("gru", 2): 0.74}
    for i, ((model, seed), acc) in enumerate(accs.items()):
        d = tmp_path / f"{i}_model={model},trainer.seed={seed}"
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"model={model}", f"trainer.seed={seed}"]), d / ".hydra" / "overrides.yaml")
        (d / "metrics.json").write_text(json.dumps({
            "status": "finished", "objective": {"metric": "val/acc", "mode": "max", "best": acc},
            "test": {"test/acc": acc - 0.01}, "timing": {"wall_time_s": 1.0}}))
    failed = tmp_path / "5_model=gru,trainer.seed=3"  # a failed seed is not averaged in
    (failed / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["model=gru", "trainer.seed=3"]), failed / ".hydra" / "overrides.yaml")
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    written = write_summary(tmp_path)
    assert {"seeds", "seeds_plot"} <= set(written) and (tmp_path / "seeds.png").stat().st_size > 0
    with open(written["seeds"]) as f:
        groups = list(csv.DictReader(f))
    assert [g["group"] for g in groups] == ["model=lstm", "model=gru"]  # best mean first
    lstm, gru = groups
    assert lstm["seeds"] == "3" and gru["seeds"] == "2"
    assert math.isclose(float(lstm["best val/acc mean"]), 0.82) and math.isclose(float(lstm["best val/acc std"]), 0.02)
    assert math.isclose(float(gru["test/acc mean"]), 0.71) and math.isclose(float(gru["best val/acc std"]),
                                                                             0.04 / math.sqrt(2))
    md = (tmp_path / "summary.md").read_text()
    assert "## Across seeds" in md and "| model=lstm | 3 | 0.82 ± 0.02 |" in md
