"""Checkpoints: atomic under SIGKILL and a full disk, loaded only as plain values, clear when wrong."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seqexp.checkpoint
from seqexp.checkpoint import FORMAT, load_checkpoint, load_model_state, save_checkpoint
from seqexp.errors import UserError
from seqexp.train import instantiate, train
from tests.conftest import ROOT, make_cfg, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- SIGKILL mid-write
# Runs the real training command, but the second write of last.pt (replacing a good one) writes
# half its bytes, announces it with a marker file and hangs there until the test kills it.
KILLED_WRITER = """
import io, sys, threading
from pathlib import Path
import seqexp.checkpoint as c
original, marker = c.atomic_write, Path(sys.argv[1])

def atomic_write(path, write, mode="wb"):
    if Path(path).name != "last.pt" or not Path(path).exists():
        return original(path, write, mode)
    def half(f):
        buf = io.BytesIO()
        write(buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        marker.touch()
        threading.Event().wait()  # until SIGKILL
    return original(path, half, mode)

c.atomic_write = atomic_write
from seqexp.cli import train_main
sys.argv = ["train.py", *sys.argv[2:]]
train_main()
"""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} first: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tiny_text, tmp_path):
    overrides = tiny_overrides("lstm", tiny_text)
    run, marker = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(marker), *overrides, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = run / "checkpoints"
    assert len(temporaries(ckpts)) == 1  # the half-written file is there...
    ckpt = load_checkpoint(ckpts / "last.pt")  # ...and the previous checkpoint is whole
    assert ckpt["trainer"]["step"] == 6
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    # resuming ignores the stray file, removes it, and finishes the run
    metrics = train(make_cfg(*overrides, f"resume={run}"))
    assert metrics["steps"] == 12 and temporaries(ckpts) == []


# ----------------------------------------------------------------------------- full disk
class FullDisk:
    """A file on a disk that fills up after 1000 bytes."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(bytes(data[:1000]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny_text, tmp_path, monkeypatch):
    def open_(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        replacing = Path(file).parent / "last.pt"
        return FullDisk(f) if ".last.pt.tmp-" in str(file) and replacing.exists() else f

    monkeypatch.setattr(seqexp.checkpoint, "open", open_, raising=False)
    with pytest.raises(UserError, match=r"could not write .*last\.pt \(No space left on device\); free disk space"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text)), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 6
    assert temporaries(tmp_path / "checkpoints") == []


# ----------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(path, {"format": FORMAT, "model": model.state_dict(), "trainer": {"step": 1}})
    return path


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b[:100], "truncated or corrupt"),
    (lambda b: os.urandom(len(b)), "truncated or corrupt"),
    (lambda b: b"", "truncated or corrupt"),
    (lambda b: b[:300] + bytes(len(b) - 600) + b[-300:], "truncated or corrupt"),  # index intact, data not
])
def test_damaged_checkpoint_is_a_clear_error(good_checkpoint, tmp_path, damage, match):
    path = tmp_path / "last.pt"
    path.write_bytes(damage(good_checkpoint.read_bytes()))
    with pytest.raises(UserError, match=match) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_not_a_seqexp_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a seqexp checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_of_another_model_config_names_the_mismatch(tiny_text, tmp_path):
    train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.max_steps=2")), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    cfg = make_cfg(*tiny_overrides("lstm", tiny_text, "model.hidden_size=48"))
    model = instantiate(cfg.model, **ckpt["model_kwargs"])
    mismatch = r"different model config: .*weight_hh_l0 is \(128, 32\) in the file but \(192, 48\)"
    with pytest.raises(UserError, match=mismatch):
        load_model_state(model, ckpt["model"], tmp_path / "checkpoints" / "last.pt")
    model = instantiate(ckpt["config"]["model"], **ckpt["model_kwargs"])
    load_model_state(model, ckpt["model"], tmp_path / "checkpoints" / "last.pt")  # its own config fits


# ----------------------------------------------------------------------------- security
class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_payload_is_rejected_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "last.pt"
    torch.save({"format": FORMAT, "model": {}, "trainer": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"\(Unsupported global: GLOBAL io.open\).*nothing in it ran") as e:
        load_checkpoint(path)
    assert "weights_only=False" not in str(e.value)  # torch's advice to run it is not passed on
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_every_torch_load_in_seqexp_is_weights_only():
    calls = []
    for f in (ROOT / "src").rglob("*.py"):
        calls += [(f.name, c) for c in re.findall(r"torch\.load\([^)]*\)", f.read_text())]
    assert calls, "no torch.load found: the check would be empty"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_stale_temporaries_are_removed_at_start(tiny_text, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".last.pt.tmp-999").write_bytes(b"half a checkpoint")
    (tmp_path / ".metrics.json.tmp-999").write_text("{")
    keep = ckpts / "notes.txt"
    keep.write_text("mine")
    train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.max_steps=2")), tmp_path)
    assert temporaries(ckpts) == [] and temporaries(tmp_path) == [] and keep.read_text() == "mine"
