"""The gradient-by-distance report keeps two whole curves in the run's record (metrics.json):
at the initial weights and at the final ones -- what the memory lab's table and its all-families
picture read (benchmarks/long_range.py). Each is what measuring that model on the same rows gives."""

from __future__ import annotations

import math

import pytest
import torch

from seqexp.build import build_data, build_model, seed_everything
from seqexp.gradients import fixed_rows, mean, measure
from seqexp.inference import load_run
from seqexp.rundir import RunDir
from seqexp.train import train
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LAB = ["data=recall", "data.length=24", "data.num_pairs=4", "data.size=64", "data.eval_size=32", "data.batch_size=8",
       "model=lstm", "model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1", "trainer.max_steps=6",
       "trainer.eval_every=3", "trainer.checkpoint_every=3", "trainer.progress=false", "trainer.device=cpu",
       "scheduler.warmup_steps=1"]


def curve(model, data) -> list:
    return mean(*measure(model, data.task, fixed_rows(data, 64), torch.device("cpu"))).tolist()


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and y is None) or (y is not None and math.isclose(x, y, rel_tol=1e-5))
                                    for x, y in zip(a, b))


def test_the_record_keeps_the_curve_at_the_initial_and_at_the_final_weights(tmp_path):
    run = tmp_path / "run"
    record = train(make_cfg(*LAB), run)
    saved = RunDir(run).read_metrics()["gradient_distance"]  # strict JSON: null where no row reaches
    assert saved["start"]["step"] == 0 and saved["end"]["step"] == record["steps"] == 6

    cfg = make_cfg(*LAB)  # the initial weights: the same seed builds the same model, as a resume does
    seed_everything(cfg.trainer.seed)
    data = build_data(cfg.data, seed=cfg.trainer.seed)
    start = curve(build_model(cfg.model, data.model_kwargs()), data)
    end = curve(load_run(RunDir(run).last).model, data)  # the final weights
    assert same(start, saved["start"]["norm"]) and same(end, saved["end"]["norm"])
    assert not same(start, saved["end"]["norm"])  # six steps changed it
    assert saved["start"]["norm"][0] > 0 and saved["start"]["norm"][-1] is None  # nothing is 23 back from an answer


def test_without_the_picture_there_is_no_curve(tmp_path):
    record = train(make_cfg(*LAB, "logging.gradient_distance.enabled=false"), tmp_path / "run")
    assert "gradient_distance" not in record
