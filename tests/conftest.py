"""Shared fixtures: composed configs, a small deterministic corpus, the shared data copies."""

from __future__ import annotations

import io
import logging
import os
import random
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seqexp.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEQEXP_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Small enough that a whole run takes seconds on 2 cores.
TINY = {
    "rnn": ["model=rnn", "model.hidden_size=32", "model.embed_dim=16"],
    "lstm": ["model=lstm", "model.hidden_size=32", "model.embed_dim=16", "model.num_layers=2"],
    "gru": ["model=gru", "model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1"],
    "attention": ["model=attention", "model.d_model=32", "model.n_heads=2", "model.n_layers=2"],
    "ngram": ["model=ngram", "model.max_features=5000", "model.min_count=1"],  # classification only
}


def make_cfg(*overrides: str, config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def tiny_overrides(model: str, text: Path, *extra: str) -> list[str]:
    return [*TINY[model], f"data.path={text}", "data.batch_size=4", "data.seq_len=16",
            "trainer.max_steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=6",
            "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu",
            "scheduler.warmup_steps=2", "logging.sample_chars=20", *extra]


@pytest.fixture(autouse=True)
def fast_download_retries(monkeypatch):
    """A retried download (data/download.py) waits milliseconds in tests, not seconds."""
    monkeypatch.setattr("seqexp.data.download.BACKOFF", 0.01)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when the cores are busy.
    Module scope: a module's own module-scoped fixtures run after it (pytestmark usefixtures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """~12k characters of pseudo-English from a fixed seed: learnable, never changes."""
    rng = random.Random(0)
    words = "the of and to in is was that for it with as his on be at by had are but from".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


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


@pytest.fixture(scope="session")
def imdb_archive(tmp_path_factory) -> Path:
    """A small aclImdb-layout archive (48 train, 24 test reviews) with the official extras."""
    files = synthetic_reviews()
    files["aclImdb/train/unsup/0_0.txt"] = b"unlabelled, never needed"
    files["aclImdb/imdb.vocab"] = b"the\nmovie\n"
    return write_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_small.tar.gz", files)


def imdb_overrides(name: str, archive: Path, cache: Path, *extra: str) -> list[str]:
    # every setting chosen here: neither what data=imdb brings to any model (data_defaults/imdb.yaml:
    # epochs, no step checkpoints) nor each model's measured recipe (tests/test_config.py tests those)
    return ["data=imdb", "~data_defaults", "~recipe", *TINY[name], f"data.path={archive}", f"data.cache_dir={cache}", "data.batch_size=8",
            "data.min_freq=1", "data.max_len=64", "trainer.max_steps=12", "trainer.eval_every=6",
            "trainer.checkpoint_every=6", "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu",
            "scheduler.warmup_steps=2", *extra]


@pytest.fixture
def cli(monkeypatch):
    """Call the `seqexp-train` console script in-process: `cli("resume=RUN", ...)`. Hydra's
    logging setup (handlers on the root logger) is undone afterwards."""
    root = logging.getLogger()

    def call(*argv: str) -> None:
        handlers, level = root.handlers[:], root.level
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["seqexp-train", *argv])
        try:
            from seqexp.cli import train_main

            train_main()
        finally:
            GlobalHydra.instance().clear()
            for h in root.handlers[:]:
                if h not in handlers:
                    root.removeHandler(h)
                    h.close()
            for h in handlers:
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(level)

    return call
