"""A real SIGTERM to the training command: it saves last.pt, exits 75, and `resume=` continues
exactly, in the same directory, through the command line. A real USR2 (submitit's time-limit
signal) to a job of a submitit sweep: it saves last.pt, submitit requeues it, and the requeued job
continues exactly. (Sweeps stopped by Ctrl-C/SIGTERM: tests/test_sweep.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqexp.checkpoint import read as read_checkpoint
from seqexp.train import train
from tests.helpers import ROOT, assert_same_training, make_cfg, scalars, tiny_overrides, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *args]


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_exactly(tiny_text, tmp_path, cli, monkeypatch):
    """The signal to a real process; the resume is the command's (in-process: the `cli` fixture)."""
    # constant lr: the schedule does not depend on max_steps, which the resume sets
    overrides = tiny_overrides("lstm", tiny_text, "scheduler=constant", "trainer.eval_every=100000",
                               "trainer.checkpoint_every=5", "trainer.log_every=5")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: bitwise equal
    proc = subprocess.Popen(command(*overrides, "trainer.max_steps=100000", f"hydra.run.dir={run}"),
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "last.pt", proc)  # training, with the handler installed
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    step = read_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"]
    assert f"stopped: SIGTERM after step {step}; saved {run}" in err and f"resume={run}" in err
    assert "Traceback" not in err
    assert json.loads((run / "metrics.json").read_text())["status"] == "preempted"

    hydra_config = (run / ".hydra" / "config.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    cli(f"resume={run}", f"trainer.max_steps={step + 7}")  # one thread, as the process had (conftest.py)
    assert (run / ".hydra" / "config.yaml").read_bytes() == hydra_config  # the run's own config stays
    assert not (tmp_path / "outputs").exists()  # no new run directory

    straight = tmp_path / "straight"
    train(make_cfg(*overrides, f"trainer.max_steps={step + 7}"), straight)
    assert_same_training(straight, run)
    steps = [s for s, _ in scalars(run, "train/loss")]
    assert steps == list(range(5, step + 8, 5)) and len(steps) == len(set(steps))


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`, read from /proc."""
    parent_of, cmdline = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline[int(stat.parent.name)] = (stat.parent / "cmdline").read_text().replace("\0", " ")
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += [(c, cmdline[c]) for c in kids]
        todo += kids
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job process through /proc")
def test_submitit_signal_saves_then_submitit_requeues_and_the_job_resumes_exactly(tiny_text, tmp_path):
    """hydra/launcher=local: submitit's local executor, whose job process runs submitit's own
    signal handlers (SIGUSR2: checkpoint and requeue), as on SLURM, where the signal comes
    `signal_delay_s` before the time limit. Here the test sends it, mid-training."""
    overrides = tiny_overrides("rnn", tiny_text, "trainer.max_steps=400", "trainer.eval_every=200",
                               "trainer.checkpoint_every=5", "trainer.log_every=5")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: bitwise equal
    with open(tmp_path / "sweep.err", "w") as err:
        proc = subprocess.Popen(command("-m", *overrides, "hydra/launcher=local", f"hydra.sweep.dir={sweep}"),
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while not list(sweep.glob("0_*/checkpoints/last.pt")):  # the job is training
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.err").read_text()
            time.sleep(0.02)
        job_process = [p for p, cmd in children(proc.pid) if "submitit.core._submit" in cmd]
        assert len(job_process) == 1, children(proc.pid)
        os.kill(job_process[0], signal.SIGUSR2)
        assert proc.wait(timeout=300) == 0, (tmp_path / "sweep.err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (job,) = sweep.glob("0_*")
    (log,) = sweep.glob(".submitit/*/*_0_log.out")
    text = log.read_text()
    stopped = int(re.search(r"interrupted: SIGUSR2, after step (\d+)", text).group(1))
    assert 5 <= stopped < 400
    # seqexp saved first, then submitit's handler ran, requeued, and the job continued from there
    order = [text.index(s) for s in ("SIGUSR2 received: stopping after this step", "interrupted: SIGUSR2",
                                     "Caught signal SIGUSR2", "Requeued job", "continuing from checkpoints/last.pt",
                                     f"/checkpoints/last.pt at step {stopped} ", "Job completed successfully")]
    assert order == sorted(order), text
    m = json.loads((job / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 400

    straight = tmp_path / "straight"
    train(make_cfg(*overrides), straight)
    assert_same_training(straight, job)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="forwarding reads /proc")
def test_the_sweep_process_forwards_a_stop_only_to_children_that_listen():
    from seqexp.preempt import FORWARD, forward_to_jobs

    listens = (f"import signal, sys, time; signal.signal({int(FORWARD)}, lambda *a: (print('stop', flush=True), "
               "sys.exit(0))); print('ready', flush=True); time.sleep(60)")
    plain = "import time; print('ready', flush=True); time.sleep(60)"  # FORWARD would kill it
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for code in (listens, plain)]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        forward_to_jobs()
        assert procs[0].wait(timeout=30) == 0 and procs[0].stdout.read() == "stop\n"
        time.sleep(0.2)
        assert procs[1].poll() is None  # left alone
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- evaluation phase
def signal_at_batch(monkeypatch, split: str, at: int, sig=signal.SIGTERM) -> None:
    """A real `sig` to this process when the trainer's evaluation of `split` reaches batch `at`
    (the first time)."""
    import seqexp.trainer

    original, sent = seqexp.trainer.tracked, []

    def tracked(batches, **kw):
        for i, batch in enumerate(original(batches, **kw)):
            if kw["desc"] == split and i == at and not sent:
                sent.append(i)
                os.kill(os.getpid(), sig)  # Python runs the handler before the next bytecode
            yield batch

    monkeypatch.setattr(seqexp.trainer, "tracked", tracked)


@pytest.fixture
def no_default_stop(monkeypatch):
    """Without seqexp's handler a SIGTERM would end pytest: fail the test instead."""
    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached no seqexp handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_the_test_evaluation_stops_resumably_and_resume_evaluates(
        imdb_archive, tmp_path, monkeypatch, capsys, no_default_stop):
    from seqexp.errors import user_errors
    from tests.helpers import imdb_overrides

    overrides = imdb_overrides("rnn", imdb_archive, tmp_path / "cache")
    run = tmp_path / "run"
    signal_at_batch(monkeypatch, "test", 1)
    with pytest.raises(SystemExit) as e, user_errors():
        train(make_cfg(*overrides), run)
    err = capsys.readouterr().err
    assert e.value.code == 75, err
    assert (f"stopped: SIGTERM during the evaluation after training (step 12); training is saved in "
            f"{run / 'checkpoints' / 'last.pt'}. Continue with: python scripts/train.py resume={run}") in err
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "preempted" and m["steps"] == 12 and "test" not in m
    assert read_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 12

    monkeypatch.undo()  # no more signals
    resumed = train(make_cfg(*overrides, f"resume={run}"), run)
    assert resumed["status"] == "finished" and resumed["steps"] == 12
    straight = train(make_cfg(*overrides), tmp_path / "straight")
    assert resumed["test"] == straight["test"] and resumed["best"] == straight["best"]


def test_a_signal_during_a_validation_finishes_it_saves_and_stops(imdb_archive, tmp_path, monkeypatch,
                                                                 no_default_stop):
    """The validation's result goes into the checkpoint: it runs to its end, then last.pt is saved
    at that step and the run stops; resuming continues exactly."""
    from seqexp.preempt import Preempted
    from tests.helpers import imdb_overrides

    overrides = imdb_overrides("rnn", imdb_archive, tmp_path / "cache")
    run = tmp_path / "run"
    signal_at_batch(monkeypatch, "val", 0)  # the first validation: step 6 of 12
    with pytest.raises(Preempted, match=f"SIGTERM after step 6; saved .*Continue with: .*resume={run}"):
        train(make_cfg(*overrides), run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "preempted" and m["steps"] == 6 and m["final"]["val/count"] > 0

    monkeypatch.undo()
    train(make_cfg(*overrides, f"resume={run}"), run)
    train(make_cfg(*overrides), tmp_path / "straight")
    assert_same_training(tmp_path / "straight", run)
