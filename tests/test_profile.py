"""trainer.profile=true: a Chrome trace of a few steps in the run's profile/ folder, and the table of
the top operators logged; without it, no profile/ folder."""

from __future__ import annotations

import json
import logging

import pytest

from seqexp.rundir import RunDir
from seqexp.train import train
from tests.helpers import make_cfg, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_profiled_run_writes_a_trace_and_logs_the_top_operators(tiny_text, tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="seqexp"):
        train(make_cfg(*tiny_overrides("gru", tiny_text, "trainer.profile=true", "trainer.max_steps=8",
                                       "trainer.eval_every=8", "trainer.checkpoint_every=8",
                                       "logging.tensorboard=false")), run.path)
    traces = list(run.profile.glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names)
    assert sum(n.startswith("ProfilerStep#") for n in names) == 3  # the three recorded steps
    table = next(r.getMessage() for r in caplog.records if "top operators" in r.getMessage())
    assert "aten::" in table and "Self CPU" in table


def test_too_short_a_run_says_so_and_an_unprofiled_run_has_no_folder(tiny_text, tmp_path, caplog):
    short = RunDir(tmp_path / "short")
    with caplog.at_level(logging.WARNING, logger="seqexp"):
        train(make_cfg(*tiny_overrides("gru", tiny_text, "trainer.profile=true", "trainer.max_steps=2",
                                       "logging.tensorboard=false")), short.path)
    assert "no trace written" in caplog.text and not short.profile.exists()
    plain = RunDir(tmp_path / "plain")
    train(make_cfg(*tiny_overrides("gru", tiny_text, "trainer.max_steps=2", "logging.tensorboard=false")), plain.path)
    assert not plain.profile.exists()
