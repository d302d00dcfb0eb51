"""trainer.target: stop at the first evaluation where the monitored metric reaches a value, and
record when (steps and training time to target), exactly across a resume."""

from __future__ import annotations

import pytest

from seqexp.rundir import RunDir
from seqexp.train import train
from tests.helpers import assert_same_training, make_cfg, resume_run, run_until_signal, scalars, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(text, *extra: str) -> list[str]:
    return tiny_overrides("gru", text, "data.batch_size=16", "data.seq_len=32", "optimizer.lr=0.01",
                          "trainer.max_steps=40", "trainer.eval_every=5", "trainer.checkpoint_every=5",
                          "logging.gradient_distance.enabled=false", "logging.sample.chars=0", *extra)


def test_training_stops_at_the_first_evaluation_that_reaches_the_target_and_says_when(tiny_text, tmp_path):
    free = train(make_cfg(*overrides(tiny_text)), tmp_path / "free")
    assert free["target"] is None
    curve = scalars(tmp_path / "free", "val/loss")  # [(5, ...), (10, ...), ...]: falling
    k = next(i for i in range(2, len(curve)) if curve[i][1] < curve[i - 1][1])  # a step down, not the first
    target = (curve[k - 1][1] + curve[k][1]) / 2  # reached at evaluation k, not before
    assert all(v > target for _, v in curve[:k])

    run = tmp_path / "target"
    record = train(make_cfg(*overrides(tiny_text, f"trainer.target={target}")), run)
    step = curve[k][0]
    assert record["steps"] == step and record["status"] == "finished"  # no step after the evaluation that reached it
    assert record["target"]["metric"] == "val/loss" and record["target"]["value"] == pytest.approx(target)
    assert record["target"]["reached"] and record["target"]["step"] == step
    assert 0 < record["timing"]["target_train_time_s"] <= record["timing"]["train_time_s"]
    assert RunDir(run).read_metrics()["target"] == record["target"]
    assert scalars(run, "val/loss") == curve[: k + 1]  # the same run up to there

    missed = train(make_cfg(*overrides(tiny_text, "trainer.target=0.0")), tmp_path / "missed")
    assert missed["steps"] == 40 and missed["target"]["reached"] is False and missed["target"]["step"] is None


def test_a_resume_before_the_target_is_reached_equals_the_straight_run(tiny_text, tmp_path):
    free = train(make_cfg(*overrides(tiny_text)), tmp_path / "free")
    target = free["best"]["val/loss"] + 1e-6  # reached at the best evaluation, some way into the run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    record = train(make_cfg(*overrides(tiny_text, f"trainer.target={target}")), straight)
    stop = record["target"]["step"] - 3
    assert stop > 0
    run_until_signal(overrides(tiny_text, f"trainer.target={target}"), resumed, stop)
    resume_run(overrides(tiny_text, f"trainer.target={target}"), resumed)
    assert_same_training(straight, resumed)  # weights, losses, and metrics.json with its target entry
