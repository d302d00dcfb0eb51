"""benchmarks/long_range.py, the memory lab's grid: a --quick slice trains, records what every
cell must say (solved, steps, state size, gradient by distance, the test split on the final
weights and at induction's longer lengths), draws its pictures, reuses its cells and renders the
same table again from the JSON alone. Rows come from configs/model/ and the variants; a family
the grid has no size for trains at its own YAML's defaults."""

from __future__ import annotations

import json

import pytest

from tests.test_benchmarks import load, run

lr = load("long_range")


@pytest.mark.slow
def test_a_quick_slice_records_every_cell_draws_the_pictures_and_renders_again(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    cli = ["--quick", "--models", "lstm,ngram", "--tasks", "copy,recall,induction,adding", "--device", "cpu",
           "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    lr.main(cli)
    saved = json.loads((out / "long_range_quick.json").read_text())
    cells = {(r["model"], r["task"], r["length"], r["width"]) for r in saved["results"]}
    assert cells == {("lstm", "copy", 4, None), ("lstm", "copy", 8, None), ("lstm", "recall", 24, None),
                     ("lstm", "recall", 24, 0.5), ("lstm", "induction", 6, None), ("lstm", "adding", 6, None)}
    for r in saved["results"]:
        assert r["steps"] == 4 and r["solved"] is False and r["solved_step"] is None  # the quick cap, not solved
        assert r["state_size"] == 2 * (8 if r["width"] else 16)  # LSTM 1 x 16 (h and c); the narrow one 8
        assert r["train_s"] > 0 and r["cpu_s"] > 0
        test = r["test"]["test"]  # adding: MSE beside the baseline's, and the rows within 0.04
        assert test["mse"] > 0 and test["baseline_mse"] > 0 if r["task"] == "adding" else \
            0 <= test["exact"] <= test["acc"] <= 1
        grad = r["gradient"]
        assert grad["start"]["step"] == 0 and grad["end"]["step"] == 4 and grad["start"]["norm"][1] > 0
    induction = next(r for r in saved["results"] if r["task"] == "induction")
    assert set(induction["test"]) == {"test", "test@12", "test@24", "test@48", "test@96"}  # 2x..16x
    assert any("ngram on copy: model=ngram" in s for s in saved["skipped"])
    for picture in ("long_range_quick", "long_range_quick_extrapolation", "long_range_quick_state",
                    "long_range_quick_gradients"):
        assert (out / f"{picture}.png").stat().st_size > 0, picture
    table = run.last_table(capsys.readouterr().out)
    assert "| copy (4, 8) | lstm | 1,914 | 32 | T=4: ✗ " in table
    assert "| induction (6; tested to 16x) | lstm |" in table and "| T=96: " in table
    assert "| recall by width (T=24) | lstm |" in table and "x0.5, state 16: ✗" in table
    assert "| adding (6) | lstm |" in table and "(MSE " in table

    lr.main(cli)
    assert "6 reused" in capsys.readouterr().out
    lr.main([*cli, "--render"])
    assert run.last_table(capsys.readouterr().out) == table


def test_rows_come_from_the_families_and_a_family_without_a_size_keeps_its_yaml(monkeypatch):
    grid = lr.GRIDS["cpu"]
    rows = lr.rows(grid, ["attention", "lstm", "mamba"])  # mamba: a family a later change adds
    assert rows["lstm"] == ("lstm", ["model=lstm", *lr.SIZES["small"]["lstm"]], None)
    assert rows["attention + conv 4"][1][-1] == "model.conv_kernel=4"
    assert rows["attention (window 16)"][2] == ("copy",)
    assert rows["mamba (selective=false)"][1][-1] == "model.selective=false"
    monkeypatch.delitem(lr.SIZES["small"], "lstm")
    assert lr.rows(grid, ["lstm"])["lstm"] == ("lstm", ["model=lstm"], None)
    assert lr.narrower("lstm", ["model=lstm"], 0.5)[-1] == "model.hidden_size=128"  # half of its YAML's 256
