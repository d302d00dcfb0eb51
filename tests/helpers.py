"""What the test modules share that is not a fixture: composed configs, tiny overrides, synthetic
IMDB archives, and the protocols of the resume and DDP tests (fixtures: conftest.py).

A data kind plugs into the resume protocol (`run_until_signal`, `resume_run`,
`assert_same_training`) by a branch of `overrides_for`, and into the DDP tests by one of
`ddp_overrides_for`.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seqexp.checkpoint import read
from seqexp.configs import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEQEXP_SHARED_DATA", ROOT.parent / "shared" / "data"))
# a model and a dataset that live only under tests/extension, found through Hydra's search path
EXTENSION = Path(__file__).parent / "extension"
SEARCH = f"hydra.searchpath=[file://{EXTENSION / 'configs'}]"


# ----------------------------------------------------------------------------- configs
# Small enough that a whole run takes seconds on 2 cores.
TINY = {
    "rnn": ["model=rnn", "model.hidden_size=32", "model.embed_dim=16"],
    "lstm": ["model=lstm", "model.hidden_size=32", "model.embed_dim=16", "model.num_layers=2"],
    "gru": ["model=gru", "model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1"],
    "attention": ["model=attention", "model.d_model=32", "model.n_heads=2", "model.n_layers=2"],
    "ngram": ["model=ngram", "model.max_features=5000", "model.min_count=1"],  # classification only
}


_COMPOSED: dict = {}  # (config_name, overrides) -> the composed config, in this test process


def make_cfg(*overrides: str, config_name: str = "train"):
    """The config `scripts/train.py OVERRIDES` composes. Composing costs ~0.1 s (Hydra reads and
    merges every YAML file again), and tests compose the same overrides again and again (a run,
    its resume, its variants): each is composed once per test process, and every call gets its
    own copy. The config files do not change during a test session."""
    GlobalHydra.instance().clear()
    key = (config_name, overrides)
    if key not in _COMPOSED:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            _COMPOSED[key] = compose(config_name, overrides=list(overrides))
    return copy.deepcopy(_COMPOSED[key])


# Every report off (seqexp/reports/): in a run this small, drawing the gradient-by-distance plot
# and the attention maps costs several times the training (about 0.25 s and 0.4 s a picture). A
# test of a report turns it on in its `extra` (a later override wins), e.g. "logging.sample.chars=20".
REPORTS_OFF = ["logging.gradient_distance.enabled=false", "logging.attention_maps.enabled=false",
               "logging.confusion.enabled=false", "logging.wrong_examples.count=0", "logging.sample.chars=0"]


def tiny_overrides(model: str, text: Path, *extra: str) -> list[str]:
    return [*TINY[model], f"data.path={text}", "data.batch_size=4", "data.seq_len=16",
            "trainer.max_steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=6",
            "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu",
            "scheduler.warmup_steps=2", *REPORTS_OFF, *extra]


def imdb_overrides(name: str, archive: Path, cache: Path, *extra: str) -> list[str]:
    # every setting chosen here: neither what data=imdb brings to any model (data_defaults/imdb.yaml:
    # epochs, no step checkpoints) nor each model's measured recipe (tests/test_config.py tests those)
    return ["data=imdb", "~data_defaults", "~recipe", *TINY[name], f"data.path={archive}", f"data.cache_dir={cache}",
            "data.batch_size=8", "data.min_freq=1", "data.max_len=64", "trainer.max_steps=12", "trainer.eval_every=6",
            "trainer.checkpoint_every=6", "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu",
            "scheduler.warmup_steps=2", *REPORTS_OFF, *extra]


def lm_capable(name: str, *overrides: str) -> bool:
    """Whether model config `name` (a YAML of configs/model or the search path) models language:
    its own check_config is asked, no name is special."""
    from seqexp.build import locate
    from seqexp.errors import UserError

    node = make_cfg(*overrides, f"model={name}").model
    try:
        locate(node._target_).check_config(node, "lm")
    except UserError:
        return False
    return True


# ----------------------------------------------------------------------------- IMDB
POSITIVE = "good great wonderful superb loved brilliant".split()
NEGATIVE = "bad awful boring terrible hated dull".split()
FILLER = "the movie film plot actor scene it was a and of story".split()


def synthetic_reviews(n_train: int = 24, n_test: int = 12, seed: int = 0, tag: bool = False) -> dict[str, bytes]:
    """{member name: bytes}: a sentiment word or two in filler, with markup, case and punctuation.
    With `tag`, each review starts with its own word (id0, id1, ...) that identifies it."""
    rng = random.Random(seed)
    files = {"aclImdb/README": b"synthetic aclImdb for tests\n"}
    for split, n in (("train", n_train), ("test", n_test)):
        for label, words in (("pos", POSITIVE), ("neg", NEGATIVE)):
            for i in range(n):
                toks = [rng.choice(FILLER) for _ in range(rng.randint(3, 60))]
                for _ in range(rng.randint(1, 3)):
                    toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
                toks = [f"id{len(files)}"] * tag + toks
                text = " ".join(toks).capitalize() + "!<br /><br />" + rng.choice(FILLER).upper() + "."
                files[f"aclImdb/{split}/{label}/{i}_{rng.randint(1, 10)}.txt"] = text.encode()
    return files


def write_archive(path: Path, files: dict[str, bytes], extra=()) -> Path:
    """A .tar.gz with `files` as regular members plus `extra` raw TarInfo members (no data)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


# ----------------------------------------------------------------------------- runs and their files
def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory that `build(directory)` fills once per test session, shared by its test processes
    (pytest-xdist's workers): the first to ask builds it, under a lock; the others wait, then read
    it. For runs that several tests only read. (A session-scoped fixture is built once per
    process; one built here is also built once for both.)"""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder: each worker's basetemp is one of its folders
    target = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (target / ".built").is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / ".built").touch()
    return target


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Model weights and optimizer state of checkpoints/last.pt, flattened."""
    ckpt = read(run_dir / "checkpoints" / "last.pt")
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"weights.{k}": v for k, v in ckpt["trainer"].get("weights", {}).items()})  # trainer.ema
    for i, s in ckpt["trainer"]["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """What TensorBoard shows: events after a resumed run's purge_step are dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(e.step, e.value) for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


def metrics(run_dir: Path) -> dict:
    """metrics.json without its timing (the only entries two runs of one config may differ in)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    m.pop("timing")
    return m


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` and its bytes: compare before and after to see what was written."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until `path` exists; fails when `proc` exits first or the time is up."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} first: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- resume: N + N == 2N
KINDS = ["char", "imdb"]
STOP, TOTAL = 13, 28  # mid-epoch (20 batches each), mid logging window (every 3)


def overrides_for(kind: str, model: str, request, *extra: str) -> list[str]:
    """A tiny config of `kind`: dropout, so that the RNG state matters; log_every=3 (tiny_overrides);
    fewer than TOTAL - STOP batches per epoch, so that the resumed part crosses an epoch."""
    if kind == "char":
        return tiny_overrides(model, request.getfixturevalue("tiny_text"), "data.batch_size=16", "data.seq_len=32",
                              "model.dropout=0.2", f"trainer.max_steps={TOTAL}", "trainer.eval_every=10",
                              "trainer.checkpoint_every=10", *extra)
    if kind == "imdb":  # 43 training reviews in batches of 8: 6 per epoch
        archive, cache = request.getfixturevalue("imdb_archive"), request.getfixturevalue("tmp_path") / "cache"
        return imdb_overrides(model, archive, cache, "model.dropout=0.2", f"trainer.max_steps={TOTAL}",
                              "trainer.eval_every=10", "trainer.checkpoint_every=10", *extra)
    raise ValueError(kind)


def run_until_signal(overrides: list[str], run_dir: Path, stop_at: int) -> None:
    """Train, and stop after step `stop_at` with a real SIGINT (as Ctrl-C would)."""
    from seqexp.preempt import Preempted
    from seqexp.train import train
    from seqexp.update import Update

    original = Update.__call__

    def call(self, micro, carried, step):
        out = original(self, micro, carried, step)
        if step == stop_at:  # the step's number: `stop_at` steps are taken once it returns
            signal.raise_signal(signal.SIGINT)
        return out

    Update.__call__ = call
    try:
        with pytest.raises(Preempted, match=f"SIGINT after step {stop_at}; saved"):
            train(make_cfg(*overrides), run_dir)
    finally:
        Update.__call__ = original


def resume_run(overrides: list[str], run_dir: Path, *extra: str) -> dict:
    from seqexp.train import train

    return train(make_cfg(*overrides, f"resume={run_dir}", *extra), run_dir)


def straight_and_stopped(overrides: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The resume protocol: a straight run, and the same run stopped by a SIGINT after STOP steps
    and resumed, which must equal it bitwise. Returns (straight, partial): `partial` is a copy of
    the stopped run before it resumed, for a resume without one ingredient that must not equal it."""
    from seqexp.train import train

    straight, resumed, partial = (tmp_path / name for name in ("straight", "resumed", "partial"))
    train(make_cfg(*overrides), straight)
    run_until_signal(overrides, resumed, STOP)
    shutil.copytree(resumed, partial)  # the stopped run, before it resumes
    resume_run(overrides, resumed)
    assert_same_training(straight, resumed)
    return straight, partial


def assert_same_training(a: Path, b: Path) -> None:
    assert same_tensors(final_state(a), final_state(b)), "final weights or optimizer state differ"
    for tag in ("train/loss", "train/grad_norm", "train/lr", "val/loss"):
        assert scalars(a, tag) == scalars(b, tag), tag
    assert metrics(a) == metrics(b)


def drop_carried_state(monkeypatch) -> None:
    """A resume that loses the carried RNN state (starts the next chunk from zeros)."""
    from seqexp.trainer import Trainer

    original = Trainer.load_state_dict

    def load(self, sd):
        original(self, sd)
        self.carried = None

    monkeypatch.setattr(Trainer, "load_state_dict", load)


def poison_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the language-modelling loss NaN on the given (1-based) training calls."""
    from seqexp.tasks.lm import LanguageModeling

    original, count = LanguageModeling.loss, [0]

    def loss(self, logits, batch):
        count[0] += 1
        out = original(self, logits, batch)
        return out * float("nan") if count[0] in calls else out

    monkeypatch.setattr(LanguageModeling, "loss", loss)


# ----------------------------------------------------------------------------- a trainer driven by hand
def hand_trainer(cfg, model: torch.nn.Module, task, run_dir: Path, *, total_steps: int, batches: int):
    """A Trainer of `model` on data that is its `task` alone (`batches` training batches an
    epoch, no splits, no capabilities: no report applies), on the CPU in one process, for tests
    that take its steps themselves (`take`)."""
    from types import SimpleNamespace

    from seqexp.build import build_optimizer, instantiate
    from seqexp.distributed import Local
    from seqexp.logger import Logger
    from seqexp.rundir import RunDir
    from seqexp.trainer import Trainer

    optimizer = build_optimizer(cfg.optimizer, model)
    data = SimpleNamespace(task=task, splits={}, can=lambda capability: False,
                           num_batches=lambda split, stateful: batches)
    cpu = torch.device("cpu")
    return Trainer(cfg.trainer, model=model, data=data, optimizer=optimizer,
                   scheduler=instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps),
                   logger=Logger(), reports=cfg.logging, run_dir=RunDir(run_dir),
                   device=cpu, total_steps=total_steps, recipe={}, dist=Local(device=cpu))


def take(trainer, *steps: list[dict]) -> None:
    """fit()'s steps without its periodic work: each step on its micro-batches, then the count."""
    for micro in steps:
        trainer.carried, *_ = trainer.update(micro, trainer.carried, trainer.p.step + 1)
        trainer.p.step += 1


# ----------------------------------------------------------------------------- models
def overfit_lm(model, vocab: int, steps: int) -> float:
    """The language-modelling loss after `steps` Adam steps on one batch of 4 random rows."""
    x = torch.randint(vocab, (4, 17))
    x[:, 0] = torch.arange(4)  # distinct first tokens: every next token is predictable
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- DDP (gloo, on CPU)
DDP_TIMEOUT = 240  # s per command; a hung collective fails the test instead of the suite


def ddp_overrides_for(kind: str, model: str, request, *extra: str) -> list[str]:
    """Tiny; batch 4 = 2 rows per process; 12 steps, evaluated and checkpointed at 6 and 12."""
    if kind == "char":
        return tiny_overrides(model, request.getfixturevalue("tiny_text"), "model.dropout=0.0", *extra)
    if kind == "imdb":  # batch 8 = 4 reviews per process; the last batch of an epoch is short (3)
        archive, cache = request.getfixturevalue("imdb_archive"), request.getfixturevalue("tmp_path") / "cache"
        return imdb_overrides(model, archive, cache, "model.dropout=0.0", *extra)
    raise ValueError(kind)


# scripts/train.py, and at the very end of each process (its last atexit handler) the gloo threads
# still running: the process group's workers ("pt_gloo_runloop") and socket loop ("gloo_tcp_loop").
# A finished run must have destroyed its group, those threads joined, before the interpreter's
# exit: left to it, a rank aborted now and then ("terminate called without an active exception").
EXIT_REPORT = """
import atexit, os

def name(tid):
    try:  # a thread that ends between the listing and the read is gone, not a failure
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""

def report():
    names = [name(t) for t in os.listdir("/proc/self/task")]
    gloo = sorted(n for n in names if "gloo" in n)
    os.write(2, f"rank {os.environ['RANK']}: gloo threads at exit: {gloo}\\n".encode())  # one write: one line

atexit.register(report)
from seqexp.cli import train_main

train_main()
"""


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """scripts/train.py under torchrun with `nproc` processes; fails the test unless it exits 0 and
    (on Linux, where /proc names the threads) every rank ended with its process group destroyed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    script = ROOT / "scripts" / "train.py"
    linux = Path("/proc/self/task").is_dir()
    if linux:
        script = Path(cwd) / ".train_exit_report.py"
        script.write_text(EXIT_REPORT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "terminate called" not in r.stderr, r.stderr[-4000:]
    if linux:
        exits = sorted(re.findall(r"(rank \d+): gloo threads at exit: (.*)", r.stderr))
        assert exits == [(f"rank {i}", "[]") for i in range(nproc)], r.stderr[-4000:]
    return r


def close(a: list[tuple[int, float]], b: list[tuple[int, float]], rtol: float = 1e-5) -> bool:
    """Two scalar curves at the same steps with values within `rtol`."""
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= rtol * abs(y) for (_, x), (_, y) in zip(a, b))


def close_weights(a: dict, b: dict) -> bool:
    # atol: Adam turns the float noise in gradients that are zero in exact arithmetic (an attention
    # key's bias, the position rows only padding reaches) into updates of ~lr x 1e-3; fused AdamW's
    # arithmetic (the default) leaves 2.4e-5 of it after 12 steps where the foreach one left < 1e-5
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5) for k in a)
