"""A new task and a new dataset are one module each (plus the dataset's YAML), found through
Hydra's search path: tests/extension/count_task.py (`Counting`, with its own metric `mae`) and
count_data.py. Nothing under src/ names them. The run trains, resumes exactly, is monitored on
the task's own metric, tests on the best checkpoint, and evaluate and ensemble read it back.
"""

from __future__ import annotations

import json

import pytest

from seqexp import trust
from seqexp.commands import ensemble, evaluate
from seqexp.errors import UserError
from seqexp.train import train
from tests.helpers import REPORTS_OFF, SEARCH, assert_same_training, make_cfg, resume_run, run_until_signal

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [SEARCH, "data=count", "model=lstm", "model.hidden_size=32", "model.embed_dim=16", "model.pooling=mean",
       "optimizer.lr=0.01", "trainer.max_steps=120", "trainer.eval_every=40", "trainer.checkpoint_every=40",
       "trainer.log_every=5", "trainer.progress=false", "trainer.device=cpu", "scheduler.warmup_steps=5",
       *REPORTS_OFF]


def test_a_task_from_outside_trains_is_monitored_on_its_own_metric_and_is_evaluated(tmp_path, capsys, monkeypatch):
    cfg = make_cfg(*RUN)
    assert cfg.data._target_ == "tests.extension.count_data.CountData"
    metrics = train(cfg, tmp_path / "a")
    assert metrics["task"] == "count" and metrics["objective"]["metric"] == "val/mae"  # the task's default
    assert metrics["objective"]["mode"] == "min" and metrics["best"]["val/mae"] < 0.5  # it learned to count
    assert set(metrics["test"]) == {"test/loss", "test/acc", "test/mae", "test/count"}  # on the best checkpoint

    monkeypatch.setenv("SEQEXP_TRUST", "tests.extension")  # another process would not trust it by itself
    monkeypatch.setattr(trust, "_session", set())
    evaluate.main([str(tmp_path / "a"), f"out={tmp_path / 'eval.json'}"])
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated["val/mae"] == metrics["best"]["val/mae"] and evaluated["val/count"] == 128

    train(make_cfg(*RUN, "model=gru"), tmp_path / "b")  # another model of the same examples
    capsys.readouterr()
    ensemble.main([str(tmp_path / "a"), str(tmp_path / "b"), "split=test", f"out={tmp_path / 'ens.json'}"])
    combined = json.loads((tmp_path / "ens.json").read_text())["metrics"]
    assert set(combined) >= {"test/mae", "test/acc"} and combined["test/count"] == 128


def test_a_task_from_outside_resumes_exactly(tmp_path):
    overrides = [*RUN, "trainer.max_steps=28", "trainer.eval_every=10", "trainer.checkpoint_every=10",
                 "trainer.log_every=3", "model.dropout=0.2"]
    train(make_cfg(*overrides), tmp_path / "straight")
    run_until_signal(overrides, tmp_path / "resumed", 13)
    resume_run(overrides, tmp_path / "resumed")
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")


def test_a_task_names_the_metrics_a_run_may_monitor():
    from seqexp.config import validate

    validate(make_cfg(*RUN, "trainer.monitor=val/acc"))
    with pytest.raises(UserError, match="trainer.monitor=val/exact is not a metric this task \\(count\\) logs"):
        validate(make_cfg(*RUN, "trainer.monitor=val/exact"))
