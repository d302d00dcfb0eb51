"""Shared fixtures: a small deterministic corpus, the shared data copies, a synthetic IMDB archive,
the command line in-process. Helpers that are not fixtures: tests/helpers.py."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import SHARED_DATA, synthetic_reviews, write_archive

torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def imdb_archive(tmp_path_factory) -> Path:
    """A small aclImdb-layout archive (48 train, 24 test reviews) with the official extras."""
    files = synthetic_reviews()
    files["aclImdb/train/unsup/0_0.txt"] = b"unlabelled, never needed"
    files["aclImdb/imdb.vocab"] = b"the\nmovie\n"
    return write_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_small.tar.gz", files)


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


def pytest_sessionfinish(session):
    """The MLflow server that test_mlflow.py's processes share stops with the process that
    outlives them (pytest-xdist's controller, or the only process)."""
    if not hasattr(session.config, "workerinput"):
        from tests.mlflow_server import stop_shared_server

        stop_shared_server(session.config)
