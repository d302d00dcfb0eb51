"""A new model family and a new dataset are one module plus one YAML file each.

Both live only under tests/extension/ and are found through Hydra's search path (a command
line's `hydra.searchpath=[file://...]`): nothing under src/ or configs/ names them. Each trains,
resumes exactly and is evaluated, on both tasks, as the shipped components are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqexp import trust
from seqexp.commands import evaluate, predict
from seqexp.train import train
from tests.helpers import REPORTS_OFF, SEARCH, STOP, TOTAL, assert_same_training, make_cfg, resume_run, run_until_signal

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINER = [f"trainer.max_steps={TOTAL}", "trainer.eval_every=10", "trainer.checkpoint_every=10",
           "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu", "scheduler.warmup_steps=2",
           *REPORTS_OFF, "logging.sample.chars=20"]  # the sample: a model from outside generates text


def overrides(task: str, request, *extra: str) -> list[str]:
    if task == "lm":
        data = [f"data.path={request.getfixturevalue('tiny_text')}", "data.batch_size=16", "data.seq_len=32"]
    else:
        cache = request.getfixturevalue("tmp_path") / "cache"
        data = ["data=imdb", f"data.path={request.getfixturevalue('imdb_archive')}", f"data.cache_dir={cache}",
                "data.batch_size=8", "data.min_freq=1", "data.max_len=64"]
    return [SEARCH, "model=conv", *data, *TRAINER, *extra]


def evaluated(run: Path, tmp_path: Path, capsys, monkeypatch) -> dict:
    """evaluate, as another process would run it: the run's own model is not trusted until named."""
    monkeypatch.setattr(trust, "_session", set())  # forget that this process built it
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), f"out={tmp_path / 'refused.json'}"])
    assert e.value.code == 2 and "SEQEXP_TRUST" in capsys.readouterr().err
    monkeypatch.setenv("SEQEXP_TRUST", "tests.extension")
    evaluate.main([str(run), f"out={tmp_path / 'eval.json'}"])
    return json.loads((tmp_path / "eval.json").read_text())["metrics"]


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_a_model_found_through_the_search_path_trains_resumes_exactly_and_evaluates(task, request, tmp_path,
                                                                                   capsys, monkeypatch):
    cfg = make_cfg(*overrides(task, request))
    assert cfg.model._target_ == "tests.extension.conv_model.ConvModel"
    assert cfg.model.dim == 24 and cfg.model.width == 3  # the YAML's value; the constructor's default
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight)
    run_until_signal(overrides(task, request), resumed, STOP)
    resume_run(overrides(task, request), resumed)
    assert_same_training(straight, resumed)

    best = json.loads((straight / "metrics.json").read_text())["best"]
    metrics = evaluated(straight, tmp_path, capsys, monkeypatch)
    for key, value in best.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_a_model_found_through_the_search_path_is_checked_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        make_cfg(SEARCH, "model=conv", "model.widht=3")  # a typo: the constructor has no such key


def test_a_dataset_found_through_the_search_path_runs_end_to_end(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    metrics = train(make_cfg(SEARCH, "data=presence", "model=lstm", "model.hidden_size=32", "model.embed_dim=16",
                             "model.pooling=max", "optimizer.lr=0.01", "trainer.max_steps=120",
                             "trainer.eval_every=40", "trainer.progress=false", "trainer.device=cpu",
                             "scheduler.warmup_steps=5", *REPORTS_OFF), run)
    assert metrics["best"]["val/acc"] > 0.9  # it learned to find the token
    assert metrics["test"]["test/acc"] > 0.9  # the task evaluated the dataset's test split
    assert evaluated(run, tmp_path, capsys, monkeypatch)["val/acc"] == metrics["best"]["val/acc"]
    capsys.readouterr()
    predict.main([str(run), "2 3 1 4", "5 6 7 2"])
    assert capsys.readouterr().out.split()[::2] == ["present", "absent"]
