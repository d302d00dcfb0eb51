"""Nothing a user does by mistake loses or mislabels a run (issue 28), through the real command
line: in-process (the `cli` fixture) where the behaviour is the command's, a subprocess where it
is the process's (two at once).

- a new run into a directory that holds one is refused before anything is written; trainer.
  overwrite=true moves the old run aside, never deletes it;
- two runs started at once into one new directory: the one refused writes nothing there;
- fp16 on a CPU is refused, before any data is read;
- a checkpoint damaged anywhere is "corrupt", and the message names the run's checkpoints that
  load, in the form to use;
- a mistyped nested key is one line, exit 2, with the closest key (never Hydra's "+key" advice);
- the best checkpoint holds what evaluation and sampling need, not the training state;
- resuming a finished run says so and trains nothing, unless the resume trains it further;
- a character corpus says its vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqexp import checkpoint
from seqexp.commands import evaluate
from seqexp.rundir import RunDir
from tests.helpers import ROOT, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def quick(text: Path, *extra: str) -> list[str]:
    """A tiny run whose reports are off but the ones a test asks for: seconds, not tens."""
    return tiny_overrides("rnn", text, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2",
                          "logging.sample.chars=0", "logging.gradient_distance.enabled=false", *extra)


def files(directory: Path) -> dict[str, str]:
    """Every file below `directory` and a hash of its bytes."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(cli, capsys, *argv: str) -> str:
    """Run the command, which must exit 2 with one line on stderr; -> that line."""
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 1. an existing run
def test_a_new_run_into_a_run_directory_is_refused_and_overwrite_moves_the_old_run_aside(cli, capsys, tiny_text,
                                                                                       tmp_path):
    run = tmp_path / "runs" / "a"
    cli(*quick(tiny_text), f"hydra.run.dir={run}")
    before = files(run)
    assert "metrics.json" in before and "checkpoints/best.pt" in before

    err = refused(cli, capsys, *quick(tiny_text, "model.hidden_size=16"), f"hydra.run.dir={run}")
    assert f"{run} holds a run already" in err and f"resume={run}" in err and "trainer.overwrite=true" in err
    assert files(run) == before  # nothing written, nothing touched

    cli(*quick(tiny_text, "model.hidden_size=16"), f"hydra.run.dir={run}", "trainer.overwrite=true")
    aside = [p for p in run.parent.iterdir() if p.name.startswith("a.old-")]
    assert len(aside) == 1 and files(aside[0]) == before  # the old run, whole, beside the new one
    assert RunDir(run).read_metrics()["status"] == "finished"
    assert checkpoint.read(RunDir(run).last)["config"]["model"]["hidden_size"] == 16  # the new run's


# ----------------------------------------------------------------------------- 2. two at once
# The trials' processes: each trial forks two children at the same instant from one driver
# process that imported seqexp (and torch, and torch._dynamo, which building an optimizer
# imports) once. The children are real processes -- their own file descriptors, flock locks and
# exit statuses, the interpreter's exit (atexit) at the end -- that race from the same
# millisecond; each costs its run, not the ~3 s of imports a fresh interpreter pays.
RACE = r"""
import atexit, json, os, sys, traceback
import torch._dynamo  # noqa: F401
from seqexp.cli import train_main


def child(argv, err):
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.argv = ["train.py", *argv]
    code = 0
    try:
        train_main()
    except SystemExit as e:  # as the interpreter exits on it
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


trials, out = json.loads(sys.argv[1]), sys.argv[2]
codes = []
for i, pair in enumerate(trials):
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for j, argv in enumerate(pair):
        pid = os.fork()
        if pid == 0:
            child(argv, f"{out}/err_{i}_{j}")
        pids.append(pid)
    codes.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids])
print(json.dumps(codes))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the trials' processes are forked")
def test_of_two_runs_started_at_once_into_one_new_directory_the_refused_one_writes_nothing(tiny_text, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    lrs = ("0.001", "0.002")
    # the cheapest run that writes a run directory: one step, no events, no reports
    trials = [[[*quick(tiny_text, "trainer.max_steps=1", "trainer.eval_every=1", "trainer.checkpoint_every=1",
                       "logging.tensorboard=false", f"optimizer.lr={lr}"), f"hydra.run.dir={tmp_path / f'run{trial}'}"]
               for lr in lrs] for trial in range(10)]
    r = subprocess.run([sys.executable, "-c", RACE, json.dumps(trials), str(tmp_path)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for trial, codes in enumerate(json.loads(r.stdout.splitlines()[-1])):
        errs = [(tmp_path / f"err_{trial}_{j}").read_text() for j in range(2)]
        assert sorted(codes) == [0, 2], (trial, codes, errs)
        lr = lrs[codes.index(0)]
        # the survivor's own config, whichever started first
        assert f"lr: {lr}" in RunDir(tmp_path / f"run{trial}").config.read_text(), trial
        refusal = errs[codes.index(2)]
        assert "in use by another run" in refusal or "holds a run already" in refusal, refusal


# ----------------------------------------------------------------------------- 4. fp16 on a CPU
def test_fp16_on_a_cpu_is_refused_naming_bf16_before_any_data_is_read(cli, capsys, tmp_path):
    err = refused(cli, capsys, "trainer.precision=fp16", "trainer.device=cpu", f"data.path={tmp_path / 'none.txt'}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert "trainer.precision=bf16" in err and "none.txt" not in err  # the data was never looked at
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 5. corrupt, anywhere
def test_a_checkpoint_damaged_anywhere_is_corrupt_and_the_message_names_the_checkpoints_that_load(
        cli, capsys, tiny_text, tmp_path):
    run = RunDir(tmp_path / "run")
    cli(*quick(tiny_text, "trainer.keep_last=2"), f"hydra.run.dir={run}")
    assert {p.name for p in run.checkpoint_files()} == {"last.pt", "best.pt", "step_000004.pt", "step_000002.pt"}
    first = bytearray(run.last.read_bytes())
    first[200] ^= 0xFF  # in the pickled record at the start of the archive, not in a tensor
    run.last.write_bytes(bytes(first))
    run.step_checkpoint(2).write_bytes(run.step_checkpoint(2).read_bytes()[:-100])  # truncated: does not load

    err = refused(cli, capsys, f"resume={run.path}")
    assert f"{run.last} is corrupt" in err and "weights_only" not in err
    assert f"resume={run.step_checkpoint(4)}" in err  # the one to continue from, in the form to type
    assert f"{run.best} (for evaluate, sample, predict)" in err
    assert str(run.step_checkpoint(2)) not in err  # it does not load either: never offered

    with pytest.raises(SystemExit):
        evaluate.main([str(run.last)])
    assert "is corrupt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. key typos
@pytest.mark.parametrize("arg,closest", [("model.hiden_size=3", "model.hidden_size"),
                                         ("trainer.max_step=5", "trainer.max_steps"),
                                         ("logging.sample_chars=0", "logging.sample.chars"),
                                         ("optimizer.learning_rate=0.1", None)])
def test_a_mistyped_key_is_one_line_with_the_closest_and_never_the_plus_advice(arg, closest, cli, capsys,
                                                                               tmp_path):
    err = refused(cli, capsys, arg, f"hydra.run.dir={tmp_path / 'run'}")
    key = arg.partition("=")[0]
    assert f"'{key}' is not a key of" in err and "+" + key not in err
    if closest:
        assert closest in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 7. the best checkpoint
def test_the_best_checkpoint_holds_weights_not_training_state_and_resume_names_the_last(cli, capsys, tiny_text,
                                                                                    tmp_path):
    run = RunDir(tmp_path / "run")
    cli(*quick(tiny_text, "trainer.ema=0.5"), f"hydra.run.dir={run}")
    best, last = checkpoint.read(run.best), checkpoint.read(run.last)
    assert best["averaged"] and set(best["model"]) == set(last["model"])  # the average, and the trained weights
    assert "weights" in best["trainer"] and best["data"]["itos"] == last["data"]["itos"]
    for key in ("optimizer", "scheduler", "scaler", "rng", "carried", "window"):
        assert key not in best["trainer"] and key in last["trainer"], key
    assert run.best.stat().st_size < 0.5 * run.last.stat().st_size  # Adam's two moments are gone

    err = refused(cli, capsys, f"resume={run.best}", "trainer.max_steps=6")
    assert "no training state" in err and str(run.last) in err


def test_a_legacy_best_checkpoint_with_training_state_still_resumes(cli, tmp_path):
    import shutil

    legacy = ROOT / "tests" / "fixtures" / "legacy" / "runs" / "lm_rnn"
    run = tmp_path / "lm_rnn"
    shutil.copytree(legacy, run)
    assert "optimizer" in torch.load(run / "checkpoints" / "best.pt", weights_only=True)["trainer"]
    corpus = ROOT / "tests" / "fixtures" / "legacy" / "corpus.txt"
    steps = checkpoint.read(run / "checkpoints" / "best.pt")["trainer"]["step"]
    cli(f"resume={run / 'checkpoints' / 'best.pt'}", f"trainer.max_steps={steps + 2}", f"data.path={corpus}",
        "trainer.progress=false")
    assert RunDir(run).read_metrics()["steps"] == steps + 2


# ----------------------------------------------------------------------------- 8. a finished run
def test_resuming_a_finished_run_says_so_and_trains_nothing_unless_it_trains_further(cli, capsys, tiny_text,
                                                                                  tmp_path):
    run = RunDir(tmp_path / "run")
    cli(*quick(tiny_text), f"hydra.run.dir={run}")
    before = files(run.path)
    capsys.readouterr()
    start = time.perf_counter()
    cli(f"resume={run.path}")
    assert time.perf_counter() - start < 10
    record = run.read_metrics()
    out = capsys.readouterr().out.strip().splitlines()  # Hydra's log handler: the console
    assert out[-1].endswith(f"finished: best val/loss {record['objective']['best']:.4f} at step 4; "
                            f"run directory {run.path}")
    assert "the run has finished; nothing to do" in out[-2]
    log = RunDir.LOG
    assert {k: v for k, v in files(run.path).items() if k != log} == {k: v for k, v in before.items() if k != log}
    # nothing written but the log's lines: no evaluation, no event, no checkpoint

    cli(f"resume={run.path}", "trainer.max_steps=6")  # a longer run: it trains on
    assert run.read_metrics()["steps"] == 6


# ----------------------------------------------------------------------------- 9. messages
def test_a_character_corpus_says_its_vocabulary_and_its_unknown_characters(tiny_text, tmp_path, caplog):
    from seqexp.build import build_data
    from tests.helpers import make_cfg

    text = tmp_path / "t.txt"
    text.write_text(tiny_text.read_text() + "\u00e9\u00e9\u00e9")  # unseen in training: the last 10% validates
    with caplog.at_level(logging.INFO, logger="seqexp"):
        data = build_data(make_cfg(*tiny_overrides("rnn", text)).data, seed=0)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("char:"))
    assert f"vocabulary {data.vocab_size}" in line and "3 in val" in line and "0 in train" in line


def test_resuming_a_run_that_another_process_writes_says_wait_not_another_directory(cli, capsys, tiny_text,
                                                                                    tmp_path):
    from seqexp.files import read_json  # noqa: F401 (the run's record is what the message is about)
    from seqexp.locks import file_lock

    run = RunDir(tmp_path / "run")
    cli(*quick(tiny_text, "trainer.max_steps=2"), f"hydra.run.dir={run}")
    with file_lock(run.lock, wait=False):  # as a running process holds it
        err = refused(cli, capsys, f"resume={run.path}", "trainer.max_steps=4")
    assert "another process is writing this run" in err and "hydra.run.dir" not in err
    assert json.loads(run.metrics.read_text())["steps"] == 2
