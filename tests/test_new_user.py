"""What a new user types first (issue 20, "found trying it as a new user would"): a top-level
key that is not one (`seed=3`, `+seed=3`), a model that does not exist (`model=transformer`),
the line every run ends with, and a run path that is not quite right."""

from __future__ import annotations

import logging
import sys

import pytest

from seqexp.cli import null_choices
from seqexp.configs import CONFIG_DIR
from seqexp.config import check_keys, did_you_mean
from seqexp.errors import UserError
from seqexp.inference import find_checkpoint
from seqexp.overrides import parse
from seqexp.record import closing_line
from seqexp.resume import nearest_runs, resolve
from seqexp.train import train
from tests.helpers import make_cfg, tiny_overrides


def script(cli, capsys, monkeypatch, *args: str, cwd) -> tuple[int, str]:
    """The command in-process (the `cli` fixture), started in `cwd`: (its exit status, its stderr).
    (Exit statuses of the real process: tests/test_config.py, tests/test_trust.py.)"""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(*args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("arg", ["seed=3", "+seed=3", "++seed=3"])
def test_a_top_level_key_that_is_not_one_is_refused_with_the_key_it_probably_is(arg, tmp_path, cli, capsys,
                                                                                 monkeypatch):
    code, err = script(cli, capsys, monkeypatch, arg, cwd=tmp_path)
    assert code == 2, err
    assert err.strip() == "error: 'seed' is not a top-level config key. Did you mean trainer.seed?"
    assert list(tmp_path.iterdir()) == []  # refused before Hydra made a run directory


def test_keys_outside_the_schema_are_refused_after_composition_too():
    """The backstop for what reaches the composed config (e.g. `+trainer.foo=1`, or `+x=1` when a
    search path is given): train() refuses it, naming the closest key."""
    with pytest.raises(UserError, match="'seed' is not a top-level config key .* Did you mean trainer.seed"):
        check_keys(make_cfg("+seed=3"))
    with pytest.raises(UserError, match="'trainer.sed' is not a key of 'trainer'. Did you mean trainer.seed"):
        check_keys(make_cfg("+trainer.sed=3"))
    assert did_you_mean("logging.sampel") == " Did you mean logging.sample?"
    assert did_you_mean("logging.sample_chars") == " It is logging.sample.chars now."  # renamed (config.RENAMED)
    keys = ["logging.sample.chars", "logging.sample.prompt"]  # a node's own keys (the command line's check)
    assert did_you_mean("logging.sample.char", keys) == " Did you mean logging.sample.chars?"
    assert did_you_mean("zzz") == ""
    check_keys(make_cfg("model=gru", "experiment=imdb_lstm"))  # groups and experiments are fine


@pytest.mark.parametrize("arg,closest", [("model=transformer", "model=attention"), ("model=lstn", "model=lstm"),
                                         ("data=imdbb", "data=imdb")])
def test_a_missing_group_choice_is_one_line_with_the_closest(arg, closest, tmp_path, cli, capsys, monkeypatch):
    code, err = script(cli, capsys, monkeypatch, arg, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"did you mean {closest}?"), err
    assert "Choices: " in lines[0] and closest.partition("=")[2] + "," in lines[0]


def test_every_run_ends_with_one_line_best_test_and_directory(tiny_text, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="seqexp"):
        metrics = train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.max_steps=4", "trainer.eval_every=2")),
                        tmp_path)
    last = caplog.records[-1].getMessage()
    assert last == (f"finished: best val/loss {metrics['objective']['best']:.4f} at step {metrics['best_step']}; "
                    f"run directory {tmp_path}")
    summary = {"objective": {"metric": "val/acc", "mode": "max", "best": 0.875}, "best_step": 40,
               "test": {"test/acc": 0.8612, "test/loss": 0.3}, "stopped_early": {"step": 60}}
    assert closing_line(summary, tmp_path) == (f"finished: best val/acc 0.8750 at step 40; test/acc 0.8612 (best "
                                               f"checkpoint); stopped early at step 60; run directory {tmp_path}")


def test_a_run_path_not_found_suggests_the_nearest_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = ["outputs/2026-01-02/12-00-00-123456", "outputs/2026-01-02/13-30-00-000001",
            "outputs/2026-01-01/09-00-00-000002", "outputs/multirun/2026-01-02/12-00-00-000003/0_model=gru"]
    for r in runs:
        (tmp_path / r / "checkpoints").mkdir(parents=True)
        (tmp_path / r / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "outputs/2026-01-02/13-30-00-000001/checkpoints/step_000200.pt").write_bytes(b"")
    typed = "outputs/2026-01-02/12-00-00"  # as the README once showed it: no microseconds
    assert nearest_runs(typed)[0].as_posix() == runs[0]
    with pytest.raises(UserError, match=f"no such run directory or checkpoint.*Nearest runs: {runs[0]}"):
        resolve(typed)
    with pytest.raises(UserError, match=f"Nearest runs: {runs[0]}"):
        find_checkpoint(typed)  # evaluate, sample, predict, ensemble
    # a date that does not exist: looked for under outputs/
    assert nearest_runs("outputs/2026-01-03/12-00-00")[0].as_posix() == runs[0]
    assert nearest_runs(tmp_path / "elsewhere" / "run") != []  # an absolute path: its existing parent


def test_every_command_prints_the_installed_version(monkeypatch, capsys):
    from importlib.metadata import version

    from seqexp.cli import train_main
    from seqexp.commands import ensemble, evaluate, predict, sample
    expected = f"seqexp {version('seqexp')}"
    monkeypatch.setattr(sys, "argv", ["seqexp-train", "--version"])
    train_main()  # before Hydra, whose own --version would print Hydra's
    assert capsys.readouterr().out.strip() == expected
    for command in (evaluate, sample, predict, ensemble):
        with pytest.raises(SystemExit) as e:
            command.main(["--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == expected, command.__name__


def test_model_summary_counts_each_module_once_and_says_what_trains(tiny_text, tmp_path, caplog):
    from seqexp.build import build_model
    from seqexp.train import model_summary
    model = build_model(make_cfg("model=attention", "model.d_model=32", "model.n_heads=2", "model.n_layers=1").model,
                        dict(vocab_size=50, num_outputs=50, head="lm", max_len=16))
    model.ln_f.weight.requires_grad_(False)
    lines = model_summary(model).splitlines()
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    assert lines[0] == f"model AttentionModel: {total:,} parameters, {total - 32:,} trainable"
    rows = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert rows["tok_emb"] == "1,600" and rows["head"] == "shared" and rows["ln_f"] == "64"
    assert sum(int(v.replace(",", "")) for v in rows.values() if v != "shared") == total
    with caplog.at_level(logging.INFO, logger="seqexp"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.max_steps=2", "trainer.eval_every=2")), tmp_path)
    assert any(r.getMessage().startswith("model RecurrentModel: ") for r in caplog.records)


def test_a_run_that_fails_before_training_leaves_no_run_directory(tmp_path, monkeypatch, capsys, cli):
    """Hydra makes the run directory (.hydra/, the log file) before seqexp reads any data: a run
    refused then (here: a data file that does not exist) removes the directory it made, never
    one that was there before."""
    monkeypatch.chdir(tmp_path)

    def fails(*argv: str) -> None:
        with pytest.raises(SystemExit) as e:
            cli(f"data.path={tmp_path / 'missing.txt'}", "trainer.device=cpu", *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "missing.txt" in err, err

    fails()  # outputs/<date>/<time>-<microseconds>
    assert list((tmp_path / "outputs").glob("*/*")) == []
    fails(f"hydra.run.dir={tmp_path / 'new'}")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()  # there before the command (as a resumed run's directory is): left alone
    fails(f"hydra.run.dir={mine}")
    assert mine.is_dir()


def test_a_null_group_choice_leaves_an_optional_group_out_and_is_refused_for_a_needed_one(cli, capsys, monkeypatch,
                                                                                          tmp_path):
    """`recipe=null` means what `~recipe` does (Hydra itself fails on it with a traceback, next to
    train.yaml's interpolated defaults); `model=null` is one line naming the choices."""
    monkeypatch.chdir(tmp_path)
    argv = ["data=imdb", "recipe=null", "experiment=null", "trainer.seed=null"]
    assert null_choices(argv, parse(argv)) == ["data=imdb", "~recipe", "~experiment", "trainer.seed=null"]
    cli("model=lstm", "data=imdb", "recipe=null", "--cfg", "job")
    assert "hidden_size: 256" in capsys.readouterr().out  # model/lstm.yaml's, not the recipe's 128
    models = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
    for arg, says in [("model=null", f"every run needs a model. Choices: {models}."),
                      ("recipe=null,imdb_gru", "null cannot be one of a sweep's choices")]:
        with pytest.raises(SystemExit) as e:
            cli("data=imdb", arg)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written
