"""seqexp-ensemble: members read the reviews through their own pipelines; the mixture's metrics
are computed on every review of the split; weights are fit on validation, never on test."""

from __future__ import annotations

import json

import pytest
import torch

from seqexp.checkpoint import write
from seqexp.commands import ensemble as ens
from seqexp.commands.ensemble import Options, ensemble, fit_weights, mix, simplex
from seqexp.errors import UserError
from seqexp.inference import build_data, load_run
from seqexp.tasks.classify import Classification
from seqexp.train import train
from tests.helpers import imdb_overrides, make_cfg


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def members(imdb_archive, tmp_path_factory) -> dict:
    """Two different models, different vocabularies and truncation, trained in a sweep-like dir."""
    root = tmp_path_factory.mktemp("sweep")
    cache = root / "cache"
    train(make_cfg(*imdb_overrides("ngram", imdb_archive, cache, "data.max_len=200")), root / "0_ngram")
    train(make_cfg(*imdb_overrides("attention", imdb_archive, cache, "data.max_vocab=40")), root / "1_attention")
    train(make_cfg(*imdb_overrides("attention", imdb_archive, cache, "trainer.seed=7")), root / "other_seed")
    return {"root": root, "ngram": root / "0_ngram", "attention": root / "1_attention",
            "other_seed": root / "other_seed"}


def test_members_are_scored_on_every_review_in_split_order(members):
    run = load_run(members["attention"])
    data = build_data(run.ckpt)
    lp, labels = ens.log_probs(run.model, data, "test", run.device)
    assert lp.shape == (24, 2) and torch.equal(labels, data.splits["test"].labels)
    # the same numbers as a plain evaluation, which serves the reviews sorted by length
    m = ens.metrics(data.task, lp, labels)
    direct = Classification().evaluate(run.model, data.batches("test"), run.device,
                                       lambda: torch.autocast("cpu", enabled=False))
    assert m["acc"] == direct["acc"] and m["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_ensemble_of_two_runs_on_test_with_weights_from_val(members, tmp_path):
    result = ensemble([str(members["ngram"]), str(members["attention"])], Options(out=str(tmp_path / "e.json")), {})
    assert [m["weight"] for m in result["members"]] == pytest.approx(
        list(fit_weights(*split_lps(members, "val"))), abs=1e-9)
    assert sum(m["weight"] for m in result["members"]) == pytest.approx(1.0)
    # recompute the mixture from the members' own test predictions
    lps, labels = split_lps(members, "test")
    expected = ens.metrics(Classification(), mix(lps, tuple(m["weight"] for m in result["members"])), labels)
    assert result["metrics"]["test/acc"] == expected["acc"] and result["metrics"]["test/count"] == 24
    for m, lp in zip(result["members"], lps):
        assert m["metrics"]["test/acc"] == ens.metrics(Classification(), lp, labels)["acc"]


def split_lps(members, split: str):
    """The two members' log-probabilities on a split, and its labels."""
    out = []
    for name in ("ngram", "attention"):
        run = load_run(members[name])
        out.append(ens.log_probs(run.model, build_data(run.ckpt), split, run.device))
    return [lp for lp, _ in out], out[0][1]


def test_a_sweep_directory_stands_for_its_jobs_and_the_script_writes_json(members, tmp_path, capsys):
    out = tmp_path / "e.json"
    # other_seed sits in the same directory: a different validation split must be refused
    jobs = ens.expand([str(members["root"])])
    assert [p.split("/")[-1] for p in jobs] == ["0_ngram", "1_attention", "other_seed"]
    with pytest.raises(SystemExit) as e:
        ens.main([str(members["root"]), f"out={out}"])
    assert e.value.code == 2 and "another validation split" in capsys.readouterr().err
    assert not out.exists()  # nothing written on error
    ens.main([str(members["ngram"]), str(members["attention"]), "weights=equal", f"out={out}"])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [m["weight"] for m in saved["members"]] == [0.5, 0.5] and saved["weights_from"] == "equal"
    assert f"**{saved['metrics']['test/acc']:.4f}**" in printed


def test_by_default_the_json_goes_beside_the_runs_not_into_the_working_directory(members, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ens.main([str(members["ngram"]), str(members["attention"]) + "/checkpoints/best.pt", "weights=equal"])
    written = members["root"] / "ensemble_test.json"  # the directory both runs are in
    assert json.loads(written.read_text())["weights_from"] == "equal"
    assert list(tmp_path.iterdir()) == []
    written.unlink()  # the module's other tests list this directory


@pytest.mark.parametrize("argv, message", [
    (["one"], "at least two runs"),
    (["a", "b", "weights=best"], "weights=val or weights=equal"),
])
def test_ensemble_errors(argv, message, members, capsys):
    argv = [str(members["ngram"]) if a in ("one", "a") else str(members["attention"]) if a == "b" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        ens.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_weights_are_on_the_simplex_and_the_fit_prefers_the_better_member():
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in simplex(3))
    assert len(list(simplex(2))) == ens.GRID + 1
    labels = torch.tensor([0, 1, 0, 1])
    good = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8]]))
    bad = torch.log(torch.tensor([[0.4, 0.6], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]]))
    assert fit_weights([bad, good], labels) == (0.0, 1.0)
    torch.testing.assert_close(mix([good, bad], (1.0, 0.0)), good)


def test_a_run_saved_before_val_split_existed_gets_its_random_split_back(members, tmp_path):
    """Checkpoints from before `data.val_split` drew validation reviews at random; rebuilding
    their data must give that split, not today's default."""
    run = load_run(members["attention"])
    today = build_data(run.ckpt)
    assert run.ckpt["config"]["data"]["val_split"] == "contiguous"
    old = {**run.ckpt, "config": {**run.ckpt["config"], "data": dict(run.ckpt["config"]["data"])}}
    del old["config"]["data"]["val_split"]
    write(tmp_path / "old.pt", old)  # as that seqexp saved it; reading it upgrades the config
    rebuilt = build_data(load_run(tmp_path / "old.pt").ckpt)
    random = build_data(run.ckpt, {"data.val_split": "random"})
    assert torch.equal(rebuilt.splits["val"].offsets, random.splits["val"].offsets)
    assert not torch.equal(rebuilt.splits["val"].offsets, today.splits["val"].offsets)


def test_a_member_with_another_kind_of_validation_split_is_refused(members, imdb_archive, tmp_path):
    """Same data and seed, validation drawn at random instead of by movie: other validation reviews."""
    train(make_cfg(*imdb_overrides("attention", imdb_archive, tmp_path / "cache", "data.val_split=random")),
          tmp_path / "random_split")
    with pytest.raises(UserError, match="another validation split"):
        ensemble([str(members["attention"]), str(tmp_path / "random_split")], Options(), {})
