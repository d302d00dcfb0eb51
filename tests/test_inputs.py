"""Inputs from outside (issue 22): one data preparation per cache, bad inputs as one line.

Each bad input: one line naming what to fix, exit code 2, nothing already written touched."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seqexp.data.imdb import ImdbData
from seqexp.errors import UserError
from tests.helpers import ROOT, synthetic_reviews, write_archive

# ----------------------------------------------------------------------------- one preparation
PREPARE = textwrap.dedent("""
    import hashlib, logging, sys, time
    from pathlib import Path
    import seqexp.data.imdb as imdb
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    build = imdb.build_corpus
    def slow_build(*a, **k):  # wide open window: without the lock both processes would tokenize
        time.sleep(1.0)
        return build(*a, **k)
    imdb.build_corpus = slow_build
    archive, cache, go = sys.argv[1:]
    while not Path(go).exists():  # start together
        time.sleep(0.01)
    d = imdb.ImdbData(seed=0, path=archive, cache_dir=cache, min_freq=1)
    print(hashlib.sha256(d.ids.numpy().tobytes()).hexdigest(), d.fingerprint, len(d.itos))
""")


@pytest.mark.slow
def test_concurrent_runs_on_an_empty_cache_tokenize_once(imdb_archive, tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(imdb_archive), str(cache), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "".join(err for _, err in outs)
    assert logs.count("tokenized") == 1, logs  # one preparation
    assert outs[0][0] == outs[1][0]  # the same data in both
    assert [p.name for p in (cache / "imdb").iterdir()] == [next((cache / "imdb").glob("tokens-*.pt")).name]


TORCHRUN = textwrap.dedent("""
    import hashlib, logging, sys, time
    from seqexp import distributed, locks
    from seqexp.data.imdb import ImdbData
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    archive, cache = sys.argv[1:]
    d = distributed.setup()
    with locks.local_main_first(distributed.env()[1], d.barrier):
        start = time.time()
        data = ImdbData(seed=0, path=archive, cache_dir=cache, min_freq=1)
        end = time.time()
    print("rank", d.rank, start, end, hashlib.sha256(data.ids.numpy().tobytes()).hexdigest(), flush=True)
""")


@pytest.mark.slow
def test_under_torchrun_the_local_main_process_prepares_first(imdb_archive, tmp_path):
    script, cache = tmp_path / "prepare.py", tmp_path / "cache"
    script.write_text(TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(imdb_archive), str(cache)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("tokenized") == 1, r.stderr
    ranks = {int(w[1]): (float(w[2]), float(w[3]), w[4]) for w in map(str.split, r.stdout.splitlines())
             if w and w[0] == "rank"}
    assert ranks[1][0] >= ranks[0][1]  # rank 1 started only once rank 0 had prepared the data
    assert ranks[0][2] == ranks[1][2]  # and read the same


def test_local_main_first_orders_the_processes():
    from seqexp.locks import local_main_first

    events = []
    for rank in (0, 1):
        with local_main_first(rank, lambda: events.append(f"barrier {rank}")):
            events.append(f"prepare {rank}")
    # the main process prepares before its barrier, the others after theirs
    assert events == ["prepare 0", "barrier 0", "barrier 1", "prepare 1"]
    with pytest.raises(ValueError), local_main_first(0, lambda: events.append("released")):
        raise ValueError  # a failed preparation still releases the waiting processes
    assert events[-1] == "released"


# ----------------------------------------------------------------------------- IMDB messages
def test_skipped_reviews_are_reported_on_every_run(tmp_path, caplog):
    files = synthetic_reviews(4, 2)
    files["aclImdb/train/pos/99_10.txt"] = b"Zzgood \xff\xfe zzfilm"
    files["aclImdb/train/neg/98_1.txt"] = b"<br /><br />"
    arc = write_archive(tmp_path / "a.tar.gz", files)
    for run in ("builds the cache", "reads the cache"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="seqexp"):
            ImdbData(seed=0, path=str(arc), cache_dir=str(tmp_path / "cache"), min_freq=1, val_fraction=0.25)
        assert "1 review(s) are not valid UTF-8" in caplog.text, run
        assert "1 review(s) have no token" in caplog.text, run
        assert ("tokenized" in caplog.text) == (run == "builds the cache")


def test_not_an_archive_is_one_line(tmp_path):
    (tmp_path / "bad.tar.gz").write_bytes(os.urandom(2000))
    with pytest.raises(UserError, match="not a tar archive") as e:
        ImdbData(seed=0, path=str(tmp_path / "bad.tar.gz"), cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(e.value)


def test_imdb_path_to_a_device_says_what_it_is(tmp_path):
    with pytest.raises(UserError, match="not a regular file"):
        ImdbData(seed=0, path="/dev/null", cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- character corpora
def small_corpus(tmp_path, chars: int) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(("the cat sat on the mat and the dog ran far away\n" * 200)[:chars])
    return path


def test_size_check_matches_each_layout(tmp_path):
    from seqexp.data.char import CharData

    # B=4, T=16: streams need 4*16+1 = 65 training characters, windows (4+1)*16+1 = 81
    d = CharData(seed=0, path=str(small_corpus(tmp_path, 80)), batch_size=4, seq_len=16, val_fraction=0.1)
    have = len(d.splits["train"])
    assert 65 <= have < 81
    assert d.num_batches("train", stateful=True) >= 1
    with pytest.raises(UserError, match=rf"has {have} characters.*at least 81 for 4 windows"):
        d.num_batches("train", stateful=False)
    with pytest.raises(UserError, match="at least 65 for 4 streams"):
        CharData(seed=0, path=str(small_corpus(tmp_path, 60)), batch_size=4, seq_len=16, val_fraction=0.1)


def test_small_corpus_with_the_attention_model_is_refused_before_writing(tmp_path):
    from seqexp.train import train
    from tests.helpers import make_cfg, tiny_overrides

    run = tmp_path / "run"
    with pytest.raises(UserError, match="at least 81 for 4 windows"):
        train(make_cfg(*tiny_overrides("attention", small_corpus(tmp_path, 85))), run)
    assert not run.exists()


@pytest.mark.parametrize("content,message", [
    ("dir", "is a directory"), ("device", "not a regular file"), (b"\n\n\n", "has no text: its 3 characters are all whitespace"),
])
def test_text_files_that_are_not_text_say_what_they_are(tmp_path, content, message):
    from seqexp.data.char import CharData

    path = tmp_path / "corpus"
    if content == "dir":
        path.mkdir()
    elif content == "device":
        path = Path("/dev/null")
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        CharData(seed=0, path=str(path))
    assert str(path) in str(e.value) and "no such file" not in str(e.value)


# ----------------------------------------------------------------------------- sampling
class Diverged(torch.nn.Module):
    """A language model whose weights have become NaN."""

    context_size = None

    def forward(self, tokens, lengths=None, state=None):
        return torch.full((*tokens.shape, 5), float("nan")), state


def test_non_finite_scores_never_crash_sampling():
    from seqexp.sampling import NonFiniteSample, generate, sample_text

    with pytest.raises(NonFiniteSample, match="not finite"):
        list(generate(Diverged(), torch.zeros(1, 2, dtype=torch.long), 3, generator=torch.Generator()))

    class Chars:
        def encode(self, text):
            return torch.zeros(len(text), dtype=torch.long)

        def decode(self, ids):
            return "x" * len(ids)

    # during training: a note instead of a sample, so that the run goes on to its checkpoint
    assert "[no sample: " in sample_text(Diverged(), Chars(), "ab", 5)
    with pytest.raises(UserError, match="temperature must be > 0 and finite"):
        list(generate(Diverged(), torch.zeros(1, 2, dtype=torch.long), 3, temperature=float("nan")))


LEGACY = ROOT / "tests" / "fixtures" / "legacy" / "runs"


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_sample_refuses_a_non_finite_temperature(temperature, capsys):
    from seqexp.commands import sample

    with pytest.raises(SystemExit) as e:
        sample.main([str(LEGACY / "lm_rnn"), f"temperature={temperature}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "temperature must be > 0 and finite" in err, err


# ----------------------------------------------------------------------------- predict
class Stdin:
    def __init__(self, raw: bytes):
        self.buffer = io.BytesIO(raw)

    def isatty(self):
        return False


def test_predict_refuses_invalid_utf8_the_same_way_from_every_input(tmp_path, monkeypatch):
    from seqexp.commands.predict import read_texts

    bad = b"good film \xff\xfe\n"
    (tmp_path / "t.txt").write_bytes(bad)
    monkeypatch.setattr(sys, "stdin", Stdin(bad))
    argument = bad.decode("utf-8", "surrogateescape")  # how Python hands such bytes to a program
    for where, read in [("text argument 1", lambda: read_texts([argument], None)),
                        (f"file={tmp_path / 't.txt'}", lambda: read_texts([], str(tmp_path / "t.txt"))),
                        ("standard input", lambda: read_texts([], None))]:
        with pytest.raises(UserError, match=r"is not UTF-8 text \(invalid byte at offset 10\)") as e:
            read()
        assert str(e.value).startswith(where)
    monkeypatch.setattr(sys, "stdin", Stdin("caf\u00e9 ok\n\n".encode()))
    assert read_texts([], None) == ["caf\u00e9 ok"]


def test_predict_refuses_a_text_without_tokens(capsys):
    from seqexp.commands import predict

    with pytest.raises(SystemExit) as e:
        predict.main([str(LEGACY / "classify_rnn"), "a good film", "<br /><br />"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "text 2 of 2 has no token" in err and "'<br /><br />'" in err
    assert capsys.readouterr().out == ""  # no labels at all rather than labels out of step


# ----------------------------------------------------------------------------- run directories
def train_main_exit(monkeypatch, capsys, *argv: str) -> str:
    from seqexp.cli import train_main

    monkeypatch.setattr(sys, "argv", ["seqexp-train", *argv])
    with pytest.raises(SystemExit) as e:
        train_main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_run_directory_in_use_refuses_a_second_run(tmp_path, monkeypatch, capsys):
    from seqexp.locks import file_lock
    from seqexp.rundir import RunDir
    from tests.helpers import snapshot

    run = tmp_path / "run"
    run.mkdir()
    (run / "seqexp.log").write_text("the first run's log\n")
    before = snapshot(run)
    with file_lock(run / RunDir.LOCK, wait=False):  # as the first run holds it
        err = train_main_exit(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.max_steps=1")
        assert f"{run} is in use by another run" in err
        assert {k: v for k, v in snapshot(run).items() if k != RunDir.LOCK} == before  # nothing touched
    assert snapshot(run) == before  # and the lock file goes with its holder


def test_run_directory_lock_is_reentrant_and_released(tmp_path):
    from seqexp.locks import Busy, file_lock, hold_run_dir, release_run_dir
    from seqexp.rundir import RunDir

    hold_run_dir(tmp_path)
    hold_run_dir(tmp_path)  # train() inside the CLI that already holds it
    release_run_dir(tmp_path)
    with pytest.raises(Busy), file_lock(tmp_path / RunDir.LOCK, wait=False):
        pass
    release_run_dir(tmp_path)
    with file_lock(tmp_path / RunDir.LOCK, wait=False):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["fresh run in a read-only parent", "resume of a read-only run"])
def test_read_only_output_directory_is_one_line(tmp_path, monkeypatch, capsys, layout):
    import seqexp.locks

    parent = tmp_path / "ro"
    parent.mkdir()
    if layout == "fresh run in a read-only parent":
        argv, named = [f"hydra.run.dir={parent}/new/run"], parent
    else:
        (parent / "checkpoints").mkdir()
        argv, named = [f"hydra.run.dir='{parent}'", "hydra.output_subdir=null"], parent  # as resume_argv quotes it
    real = os.access  # root may write anywhere: pretend `parent` is read-only, as for a user
    monkeypatch.setattr(seqexp.locks.os, "access", lambda p, mode, **k: Path(p) != parent and real(p, mode, **k))
    err = train_main_exit(monkeypatch, capsys, *argv)
    assert f"{named} is read-only" in err and "hydra.run.dir" in err
    assert sorted(p.name for p in parent.iterdir()) == ([] if "fresh" in layout else ["checkpoints"])


def test_the_cli_releases_its_run_directory(tiny_text, tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from seqexp.cli import train_main
    from seqexp.rundir import RunDir
    from tests.helpers import tiny_overrides

    run = tmp_path / "run"
    run.mkdir()  # an explicit, existing hydra.run.dir: locked before Hydra starts
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["seqexp-train", f"hydra.run.dir={run}",
                                      *tiny_overrides("rnn", tiny_text, "trainer.max_steps=2")])
    train_main()
    assert (run / "metrics.json").is_file() and not RunDir(run).lock.exists()
