"""trainer.monitor / trainer.mode choose best.pt and the reported objective; trainer.patience and
min_delta stop a run early, exactly across a resume."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.monitor import metric_and_mode
from seqexp.tasks.classify import Classification
from seqexp.tasks.lm import LanguageModeling
from seqexp.train import train
from tests.helpers import (assert_same_training, imdb_overrides, make_cfg, resume_run, run_until_signal, scalars,
                           tiny_overrides)

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer_cfg(**kw):
    return OmegaConf.create({"monitor": None, "mode": None, **kw})


def test_metric_and_mode_defaults_and_inference():
    lm, cl = LanguageModeling(), Classification()
    assert metric_and_mode(trainer_cfg(), lm) == ("val/loss", "min")
    assert metric_and_mode(trainer_cfg(), cl) == ("val/acc", "max")
    assert metric_and_mode(trainer_cfg(monitor="val/bpc"), lm) == ("val/bpc", "min")  # the task's direction
    assert metric_and_mode(trainer_cfg(monitor="val/loss"), cl) == ("val/loss", "min")
    assert metric_and_mode(trainer_cfg(monitor="val/count"), cl) == ("val/count", "max")  # no direction: not "loss"
    assert metric_and_mode(trainer_cfg(monitor="val/acc", mode="min"), cl) == ("val/acc", "min")
    with pytest.raises(UserError, match="trainer.monitor=val/accuracy is not a metric .* val/loss, val/acc, val/count"):
        metric_and_mode(trainer_cfg(monitor="val/accuracy"), cl)
    with pytest.raises(UserError, match="not a metric"):
        metric_and_mode(trainer_cfg(monitor="test/acc"), cl)  # validation metrics only
    # a task that does not list its metrics: its objective alone
    bare = SimpleNamespace(name="x", objective="val/mse", mode="min")
    assert metric_and_mode(trainer_cfg(), bare) == ("val/mse", "min")
    with pytest.raises(UserError, match="choose one of val/mse"):
        metric_and_mode(trainer_cfg(monitor="val/r2"), bare)


def test_an_unlogged_metric_is_refused_before_anything_is_read_or_written(tiny_text, tmp_path):
    with pytest.raises(UserError, match="trainer.monitor=val/acc is not a metric this task \\(lm\\) logs"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.monitor=val/acc")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="mode"):
        make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.mode=up"))  # an enum: refused while composing
    with pytest.raises(UserError, match="trainer.patience must be >= 0"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.patience=-1")), tmp_path / "run")


def test_the_monitored_metric_chooses_best_and_the_objective(imdb_archive, tmp_path):
    """A classifier monitored on val/loss: best.pt is the evaluation with the lowest loss."""
    run = tmp_path / "run"
    metrics = train(make_cfg(*imdb_overrides("rnn", imdb_archive, tmp_path / "cache", "trainer.monitor=val/loss",
                                             "trainer.eval_every=3", "logging.wrong_examples.count=0")), run)
    assert metrics["objective"]["metric"] == "val/loss" and metrics["objective"]["mode"] == "min"
    losses = scalars(run, "val/loss")
    step, low = min(losses, key=lambda sv: sv[1])
    assert metrics["best_step"] == step and metrics["objective"]["best"] == pytest.approx(low, rel=1e-6)
    assert metrics["stopped_early"] is None


def patience_overrides(tiny_text, *extra):
    # min_delta larger than any change: only the first evaluation is an improvement, so with
    # patience 2 the run stops at the third evaluation (step 6 of 12)
    return tiny_overrides("lstm", tiny_text, "trainer.eval_every=2", "trainer.checkpoint_every=2",
                          "trainer.patience=2", "trainer.min_delta=100", "model.dropout=0.2", *extra)


def test_patience_stops_the_run_and_metrics_say_when(tiny_text, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg(*patience_overrides(tiny_text)), run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved["steps"] == 6
    assert saved["stopped_early"] == {"step": 6, "patience": 2, "min_delta": 100.0}
    assert [s for s, _ in scalars(run, "val/loss")] == [2, 4, 6]
    assert metrics["best_step"] in (2, 4, 6)  # best.pt still follows every strict improvement
    # without min_delta the loss keeps improving: no early stop
    full = train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.patience=2")), tmp_path / "full")
    assert full["steps"] == 12 and full["stopped_early"] is None


def test_patience_stops_a_classifier_and_tests_the_best_checkpoint(imdb_archive, tmp_path):
    metrics = train(make_cfg(*imdb_overrides("rnn", imdb_archive, tmp_path / "cache", "trainer.eval_every=2",
                                             "trainer.patience=1", "trainer.min_delta=2", "logging.wrong_examples.count=0")),
                    tmp_path / "run")
    assert metrics["steps"] == 4 and metrics["stopped_early"]["step"] == 4
    assert metrics["test"]["test/count"] == 24  # the test split, on best.pt, as usual


def test_resume_in_the_middle_of_a_patience_countdown_equals_straight(tiny_text, tmp_path):
    overrides = patience_overrides(tiny_text)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(*overrides), straight)
    run_until_signal(overrides, resumed, 5)  # after the evaluation at 4: one of two evaluations waited
    resume_run(overrides, resumed)
    assert_same_training(straight, resumed)
    # a run that stopped early is finished: resuming it trains no further
    again = tmp_path / "again"
    shutil.copytree(straight, again)
    assert resume_run(overrides, again)["steps"] == 6
    # the monitored metric is what best was chosen by: it cannot change at a resume
    with pytest.raises(UserError, match="trainer.monitor: None -> val/bpc"):
        resume_run(overrides, again, "trainer.monitor=val/bpc")


def test_optuna_optimises_the_monitored_metric_in_its_mode():
    from hydra_plugins.seqexp_optuna_sweeper.optuna_sweeper import objective_direction
    assert objective_direction(make_cfg("data=imdb")) == "maximize"  # val/acc
    assert objective_direction(make_cfg("data=imdb", "trainer.monitor=val/loss")) == "minimize"
    assert objective_direction(make_cfg("trainer.monitor=val/bpc")) == "minimize"
    assert objective_direction(make_cfg("data=imdb", "trainer.mode=min")) == "minimize"


# ----------------------------------------------------------------------------- per-length lab metrics
LAB = ["data=copy", "data.length=4", "data.num_symbols=2", "data.alphabet=3", "data.size=64", "data.eval_size=16",
       "data.batch_size=8", "model=rnn", "model.hidden_size=16", "model.embed_dim=8", "trainer.max_steps=4",
       "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.progress=false", "trainer.device=cpu",
       "logging.tensorboard=false", "scheduler.warmup_steps=1"]


def test_the_data_names_the_metrics_at_each_evaluated_length():
    """The names trainer.monitor may choose come from the data's config: the memory lab logs each
    metric again at every other length of data.eval_lengths (val/exact@200)."""
    from seqexp.data.memory import CopyData

    cfg = make_cfg("data=copy", "data.length=50", "data.eval_lengths=[200,50,200]")
    modes = CopyData.metric_modes(cfg.data)
    assert modes["exact@200"] == "max" and modes["loss@200"] == "min" and modes["exact"] == "max"
    assert not any(k.endswith("@50") for k in modes)  # the training length is val itself
    validate(make_cfg("data=copy", "data.eval_lengths=[200]", "trainer.monitor=val/exact@200"))
    optuna = make_cfg("data=copy", "data.eval_lengths=[200]", "trainer.monitor=val/exact@200")
    from hydra_plugins.seqexp_optuna_sweeper.optuna_sweeper import objective_direction
    assert objective_direction(optuna) == "maximize"
    with pytest.raises(UserError, match="trainer.monitor=val/exact@400 is not a metric .* val/exact@200"):
        validate(make_cfg("data=copy", "data.eval_lengths=[200]", "trainer.monitor=val/exact@400"))
    with pytest.raises(UserError, match="trainer.monitor=val/exact@200 is not a metric"):
        validate(make_cfg("data=copy", "trainer.monitor=val/exact@200"))  # no such length evaluated


def test_a_per_length_metric_chooses_best(tmp_path):
    """trainer.monitor=val/loss@6 on a copy task evaluated at length 6 too: accepted, and best.pt is
    the evaluation with the lowest loss at that length."""
    run = tmp_path / "run"
    metrics = train(make_cfg(*LAB, "data.eval_lengths=[6]", "trainer.monitor=val/loss@6", "logging.tensorboard=true"), run)
    assert metrics["objective"]["metric"] == "val/loss@6" and metrics["objective"]["mode"] == "min"
    step, low = min(scalars(run, "val/loss@6"), key=lambda sv: sv[1])
    assert metrics["best_step"] == step and metrics["objective"]["best"] == pytest.approx(low, rel=1e-6)
