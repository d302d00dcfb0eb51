"""Bad input as the command line reports it: one line naming the problem and the fix, a non-zero
exit code, no traceback unless SEQEXP_DEBUG=1, and nothing already written is changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seqexp.errors import user_errors
from seqexp.errors import UserError
from seqexp.train import train
from tests.helpers import ROOT, make_cfg, snapshot, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def finished(tmp_path_factory, tiny_text) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.max_steps=6")), run)
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 100)


CASES = {
    # name: (what to break in a copy of a finished run, overrides, expected message, fix named)
    # a new run in the run's directory: refused as such, or, allowed to move it aside, refused for
    # its data before the old run is moved
    "a directory that holds a run": (None, ["trainer.seed=3"], "holds a run already", "trainer.overwrite=true"),
    "missing data file": (None, ["data.path={tmp}/nope.txt", "trainer.overwrite=true"], "no such file",
                          "Point data.path"),
    "empty text file": ("empty", ["data.path={tmp}/empty.txt", "trainer.overwrite=true"], "is empty",
                        "Point data.path"),
    "resume of a missing run": (None, ["resume={tmp}/no-such-run"], "no such run directory", "resume=latest"),
    # a damaged last.pt names the run's checkpoints that load, each in the form to use it
    "truncated checkpoint": (truncate, ["resume={run}"], "last.pt is corrupt (", "Checkpoints of the run that load: "
                             "{run}/checkpoints/best.pt (for evaluate, sample, predict); "
                             "resume={run}/checkpoints/step_000006.pt."),
    "unreadable checkpoint": (garble, ["resume={run}"], "last.pt is corrupt (", "Checkpoints of the run that load: "
                              "{run}/checkpoints/best.pt (for evaluate, sample, predict); "
                              "resume={run}/checkpoints/step_000006.pt."),
    "another model config": (None, ["resume={run}", "model.hidden_size=8"], "model.hidden_size: 32 -> 8",
                             "start a new run"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_with_the_fix(case, finished, tiny_text, tmp_path, capsys):
    damage, extra, problem, fix = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    if damage == "empty":
        (tmp_path / "empty.txt").write_text("")
    elif damage is not None:
        damage(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    extra = [e.format(tmp=tmp_path, run=run) for e in extra]
    fix = fix.format(run=run)
    with pytest.raises(SystemExit) as e, user_errors():
        train(make_cfg(*tiny_overrides("rnn", tiny_text), *extra), None if "resume" in extra[0] else run)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run"]  # not moved aside
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert problem in err and fix in err and "Traceback" not in err
    assert snapshot(run) == before  # nothing written was touched


def test_debug_switch_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("SEQEXP_DEBUG", "1")
    with pytest.raises(UserError, match="boom"), user_errors():
        raise UserError("boom")


def script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_resume_of_a_missing_run_creates_no_directory(tmp_path, monkeypatch, cli, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(f"resume={tmp_path}/gone")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such run directory" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # Hydra made no run directory


def test_wrong_value_type_names_the_key(tmp_path, monkeypatch, cli, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli("trainer.max_steps=ten")
    err = capsys.readouterr().err
    assert e.value.code != 0 and "trainer.max_steps" in err and "ten" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_wrong_value_type(tmp_path, monkeypatch):
    """The real process: SEQEXP_DEBUG=1 lets the error through, and the interpreter prints it."""
    monkeypatch.chdir(tmp_path)
    r = script("trainer.max_steps=ten", SEQEXP_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "trainer.max_steps" in r.stderr
