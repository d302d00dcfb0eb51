"""Checkpoints: atomic under SIGKILL and a full disk, loaded only as plain values, clear when wrong."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqexp.files
from seqexp.build import instantiate
from seqexp.checkpoint import FORMAT, load_model_state, write
from seqexp.checkpoint import read as read_checkpoint
from seqexp.errors import UserError
from seqexp.train import train
from tests.helpers import ROOT, make_cfg, tiny_overrides, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- SIGKILL mid-write
# Runs the real training command, but the second write of last.pt (replacing a good one) writes
# half its bytes, announces it with a marker file and hangs there until the test kills it.
KILLED_WRITER = """
import io, sys, threading
from pathlib import Path
import seqexp.files as c
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


@pytest.mark.slow
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
    ckpt = read_checkpoint(ckpts / "last.pt")  # ...and the previous checkpoint is whole
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

    monkeypatch.setattr(seqexp.files, "open", open_, raising=False)
    with pytest.raises(UserError, match=r"could not write .*last\.pt \(No space left on device\); free disk space"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text)), tmp_path)
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 6
    assert temporaries(tmp_path / "checkpoints") == []


# ----------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    write(path, {"format": FORMAT, "model": model.state_dict(), "trainer": {"step": 1}})
    return path


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],
    lambda b: b[:100],
    lambda b: os.urandom(len(b)),
    lambda b: b"",
    lambda b: b[:300] + bytes(len(b) - 600) + b[-300:],  # index intact, data not
])
def test_damaged_checkpoint_is_a_clear_error(good_checkpoint, tmp_path, damage):
    path = tmp_path / "last.pt"
    path.write_bytes(damage(good_checkpoint.read_bytes()))
    with pytest.raises(UserError, match=r"is corrupt \(.+\); not loaded\. No other checkpoint of the run") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    assert "weights_only" not in str(e.value)  # torch's advice to unpickle it fully is never passed on


def test_not_a_seqexp_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a seqexp checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_checkpoint_of_another_model_config_names_the_mismatch(tiny_text, tmp_path):
    train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.max_steps=2")), tmp_path)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
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
        read_checkpoint(path)
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
    """What a killed writer left in a run's directory is cleared when the run starts again."""
    overrides = tiny_overrides("rnn", tiny_text, "trainer.max_steps=2")
    train(make_cfg(*overrides), tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".last.pt.tmp-999").write_bytes(b"half a checkpoint")
    (tmp_path / ".metrics.json.tmp-999").write_text("{")
    keep = ckpts / "notes.txt"
    keep.write_text("mine")
    train(make_cfg(*overrides, "trainer.max_steps=4", f"resume={tmp_path}"), tmp_path)
    assert temporaries(ckpts) == [] and temporaries(tmp_path) == [] and keep.read_text() == "mine"


def test_atomic_write_fsyncs_the_file_then_its_directory(tmp_path, monkeypatch):
    """The rename itself must reach the disk: without the directory's fsync a power cut can leave
    the old name pointing at the old file (or at nothing)."""
    import stat

    synced, real = [], os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    seqexp.files.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    assert synced == ["file", "dir"] and (tmp_path / "f.bin").read_bytes() == b"x"


def test_write_json_is_strict_json(tmp_path):
    """Python's json writes bare NaN/Infinity, which strict parsers reject: they become null."""
    seqexp.files.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"a": None, "b": [None, 1.5],
                                                                                   "c": {"d": None}}


def refuse(name: str):
    raise AssertionError(f"not strict JSON: {name}")


# ----------------------------------------------------------------------------- digest
def test_digest_is_of_the_content_not_the_bytes(tmp_path):
    from seqexp.checkpoint import digest

    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0), "h": torch.ones(2, dtype=torch.bfloat16)},
           "trainer": {"step": 3, "best": None, "rng": (3, (1, 2), None), "opt": {0: {"lr": 0.1}, "x": float("nan")}}}
    torch.save(obj, tmp_path / "a.pt")
    assert digest(torch.load(tmp_path / "a.pt", weights_only=True)) == digest(obj)  # what load gives back
    assert digest(dict(reversed(list(obj.items())))) == digest(obj)  # key order does not matter
    changed = {**obj, "model": {**obj["model"], "w": obj["model"]["w"].clone()}}
    changed["model"]["w"][1, 2] = 5.000001
    assert digest(changed) != digest(obj)
    assert digest({"w": torch.ones(2, 3)}) != digest({"w": torch.ones(3, 2)})  # the shape counts
    assert digest({"w": torch.ones(2)}) != digest({"w": torch.ones(2, dtype=torch.float64)})  # and the dtype
    assert digest({"a": 1}) != digest({"a": 1.0}) != digest({"a": "1"})


def flat(x, key: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(x):
        return {key: x}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else []
    return {k: v for i, y in items for k, v in flat(y, f"{key}.{i}" if key else str(i)).items()}


def damage_tensor(path: Path, where: str) -> str:
    """Flip bytes inside the data of one tensor whose key starts with `where`, as bit rot or a bad
    copy would: the archive stays valid and torch.load does not notice. -> the key damaged."""
    import zipfile

    original, data = flat(torch.load(path, weights_only=True)), path.read_bytes()
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 4]
    for info in records:
        at = info.header_offset  # torch stores members uncompressed: the data follows the local header
        start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
        damaged = bytearray(data)
        damaged[start:start + 4] = bytes(b ^ 0x5A for b in data[start:start + 4])
        trial = path.with_name("trial.bin")
        trial.write_bytes(damaged)
        changed = [k for k, v in flat(torch.load(trial, weights_only=True)).items() if not torch.equal(v, original[k])]
        trial.unlink()
        if changed and all(k.startswith(where) for k in changed):
            path.write_bytes(damaged)
            return changed[0]
    raise AssertionError(f"no tensor under {where} in {path}")


def test_corrupt_bytes_in_a_checkpoint_are_detected(tiny_text, tmp_path, capsys):
    """Issue 22 items 3 and 4: a damaged tensor is a one-line "corrupt" error (exit 2) naming the
    file and the run's other checkpoints -- weights and optimizer state alike; before, evaluate
    printed val/loss nan with exit 0."""
    from seqexp.commands import evaluate

    run = tmp_path / "run"
    train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.max_steps=4", "trainer.eval_every=2",
                                   "trainer.checkpoint_every=2", "logging.sample.chars=0")), run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["best.pt", "last.pt", "step_000002.pt", "step_000004.pt"]
    assert damage_tensor(ckpts / "best.pt", "model.")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{ckpts / 'best.pt'} is corrupt (" in err and "weights_only" not in err
    # the others that load, in the form to use them (all three hold the training state)
    others = "; ".join(f"resume={ckpts / name}" for name in ("last.pt", "step_000004.pt", "step_000002.pt"))
    assert f"Checkpoints of the run that load: {others}." in err

    assert damage_tensor(ckpts / "last.pt", "trainer.optimizer.")  # never used by evaluate: caught all the same
    with pytest.raises(UserError, match=r"last\.pt is corrupt \(") as e:
        read_checkpoint(ckpts / "last.pt")
    # best.pt is damaged too: only the step checkpoints load
    others = "; ".join(f"resume={ckpts / name}" for name in ("step_000004.pt", "step_000002.pt"))
    assert str(e.value).endswith(f"Checkpoints of the run that load: {others}.")
    with pytest.raises(UserError, match="corrupt"):  # a resume says so too, not "lower optimizer.lr" later
        train(make_cfg(*tiny_overrides("rnn", tiny_text, f"resume={run}")))


def test_checkpoints_without_a_digest_still_load(tmp_path):
    """Files written before the digest existed (tests/fixtures/legacy) load as they are; one saved
    with the weight average says so by trainer["weights"] alone, and is read as "averaged"."""
    legacy = Path(__file__).parent / "fixtures" / "legacy" / "runs"
    plain, averaged = (read_checkpoint(legacy / name / "checkpoints" / "last.pt") for name in ("lm_rnn", "lm_lstm"))
    assert "digest" not in plain and "digest" not in averaged
    assert plain["averaged"] is False and averaged["averaged"] is True
    from seqexp.checkpoint import ema_state, trained_weights

    assert trained_weights(averaged) is averaged["trainer"]["weights"] and trained_weights(plain) is plain["model"]
    assert ema_state(plain) is None and ema_state(averaged)["average"] is averaged["model"]


def test_nonfinite_entries_are_found_in_weights_and_optimizer_state():
    from seqexp.checkpoint import nonfinite

    model = torch.nn.Linear(2, 2)
    opt_state = {"state": {0: {"step": torch.tensor(1.0), "exp_avg_sq": torch.tensor([1.0, float("inf")])}}}
    ckpt = {"model": model.state_dict(), "trainer": {"optimizer": opt_state, "carried": (torch.zeros(1), None),
                                                     "rng": {"numpy": ["MT19937", torch.arange(3)]}}}
    assert nonfinite(ckpt) == ["trainer.optimizer.state.0.exp_avg_sq"]
    ckpt["model"]["bias"][0] = float("nan")
    assert nonfinite(ckpt) == ["model.bias", "trainer.optimizer.state.0.exp_avg_sq"]
