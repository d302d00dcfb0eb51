"""A real SIGTERM to the training command: it saves last.pt, exits 75, and `resume=` continues
exactly, in the same directory, through the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from seqexp.checkpoint import load_checkpoint
from seqexp.train import train
from tests.conftest import ROOT, make_cfg, tiny_overrides
from tests.test_checkpoint import wait_for
from tests.test_resume import assert_same_training, scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *args]


def test_sigterm_saves_and_resume_continues_exactly(tiny_text, tmp_path):
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
    step = load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"]
    assert f"stopped: SIGTERM after step {step}; saved {run}" in err and f"resume={run}" in err
    assert "Traceback" not in err
    assert json.loads((run / "metrics.json").read_text())["status"] == "preempted"

    hydra_config = (run / ".hydra" / "config.yaml").read_bytes()
    r = subprocess.run(command(f"resume={run}", f"trainer.max_steps={step + 7}"), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == hydra_config  # the run's own config stays
    assert not (tmp_path / "outputs").exists()  # no new run directory

    straight = tmp_path / "straight"
    train(make_cfg(*overrides, f"trainer.max_steps={step + 7}"), straight)
    assert_same_training(straight, run)
    steps = [s for s, _ in scalars(run, "train/loss")]
    assert steps == list(range(5, step + 8, 5)) and len(steps) == len(set(steps))
