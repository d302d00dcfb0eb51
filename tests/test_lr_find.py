"""The learning-rate range test (seqexp/lr_find.py, seqexp-lr-find): a suggestion inside the range,
for a language model and a classifier; nothing written but the plot; the given model untouched."""

from __future__ import annotations

import math
import re

import pytest
import torch

from seqexp.build import build_data, build_model
from seqexp.commands import lr_find as command
from seqexp.lr_find import range_test
from tests.helpers import imdb_overrides, make_cfg, snapshot, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def in_range(lr: float, low: float, high: float) -> bool:
    return math.isfinite(lr) and low <= lr <= high


def test_command_prints_a_suggestion_and_writes_only_the_plot(tiny_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = snapshot(tiny_text.parent)
    command.main([*tiny_overrides("gru", tiny_text), "--steps", "40", "--min-lr", "1e-5", "--max-lr", "10"])
    out = capsys.readouterr().out
    suggested = float(re.search(r"suggested lr .*: (\S+)", out).group(1))
    tenth = float(re.search(r"minimum .*: (\S+)", out).group(1))
    assert in_range(suggested, 1e-5, 10) and in_range(tenth, 1e-6, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["lr_find.png"]  # no run directory, no outputs/
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert snapshot(tiny_text.parent) == corpus


def test_the_given_model_and_the_rng_are_left_as_they_were(tiny_text):
    cfg = make_cfg(*tiny_overrides("gru", tiny_text))
    data = build_data(cfg.data, seed=cfg.trainer.seed)
    model = build_model(cfg.model, data.model_kwargs())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = range_test(cfg, model=model, data=data, steps=20, min_lr=1e-4, max_lr=1.0)
    assert in_range(result.suggestion, 1e-4, 1.0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_classifier(imdb_archive, tmp_path):
    cfg = make_cfg(*imdb_overrides("lstm", imdb_archive, tmp_path / "cache"))
    result = range_test(cfg, steps=20, min_lr=1e-4, max_lr=1.0)  # 43 reviews in batches of 8: several epochs
    assert len(result.lrs) == len(result.losses) == 20 and not result.diverged
    assert in_range(result.suggestion, 1e-4, 1.0) and in_range(result.minimum, 1e-4, 1.0)


def test_stops_once_the_loss_diverges(tiny_text):
    cfg = make_cfg(*tiny_overrides("gru", tiny_text, "trainer.grad_clip=0"))
    result = range_test(cfg, steps=60, min_lr=1e-2, max_lr=1e6)
    assert result.diverged and len(result.lrs) < 60
    assert in_range(result.suggestion, 1e-2, 1e6)


@pytest.mark.parametrize("args, message", [
    (["--min-lr", "1", "--max-lr", "0.1"], "need 0 < --min-lr < --max-lr"),
    (["--plot", "missing/dir/lr.png"], "does not exist"),
    (["model=transfomer"], "no such model"),
    (["resume=outputs/x"], "fresh weights"),
    (["--steps", "many"], "--steps: invalid int value"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tiny_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        command.main([*tiny_overrides("gru", tiny_text), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
