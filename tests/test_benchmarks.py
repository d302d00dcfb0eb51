"""benchmarks/run.py: markers, table extraction, failures, and a registry whose every command parses.

No real benchmark runs here: the subprocess path is exercised with tiny fake scripts, the
registry against the scripts' own argument parsers, and overhead.py's two loops on a toy IMDB."""

from __future__ import annotations

import argparse
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seqexp.build import build_data, build_model, build_optimizer
from seqexp.config import validate
from seqexp.configs import CONFIG_DIR
from tests.helpers import REPORTS_OFF, ROOT, TINY


def load(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


run = load("run")

OLD = "Command: `python old.py`\n(2026-01-01, old machine)\n\n| a | b |\n|---|---|\n| 1 | 2 |"
# prose with what a careless rewrite would change: CRLF, trailing spaces, non-ASCII, no final newline
DOC = ("# Benchmarks\r\n\nprose   \n  ünïcode — ok\n\n<!-- bench:x -->\n" + OLD + "\n<!-- /bench:x -->\n\n"
       "more prose\n<!-- bench:y -->\nY\n<!-- /bench:y -->\nlast line, no newline")


# ----------------------------------------------------------------------------- markers
def test_replace_block_changes_only_the_block():
    assert run.replace_block(DOC, "x", "NEW") == DOC.replace(OLD, "NEW")
    assert run.replace_block(DOC, "y", "| t |") == DOC.replace("\nY\n", "\n| t |\n")


def test_missing_section_is_appended_under_a_heading():
    block = "<!-- bench:z -->\nZ\n<!-- /bench:z -->\n"
    assert run.replace_block(DOC, "z", "Z") == DOC + "\n\n## z\n\n" + block
    assert run.replace_block("text\n", "z", "Z") == "text\n\n## z\n\n" + block
    assert run.replace_block("", "z", "Z") == "## z\n\n" + block


@pytest.mark.parametrize("doc", ["<!-- bench:x -->\nno end", "<!-- /bench:x -->\n<!-- bench:x -->",
                                 "<!-- bench:x -->\n<!-- /bench:x -->\n<!-- bench:x -->\n<!-- /bench:x -->"])
def test_broken_markers_are_refused(doc):
    with pytest.raises(ValueError, match="markers of x"):
        run.replace_block(doc, "x", "NEW")


def test_last_table_is_taken():
    out = "log | not a table\n| a |\n|---|\n| 1 |\ntext\n\n| b | c |\n|---|---|\n| 2 | 3 |  \nsummary\n"
    assert run.last_table(out) == "| b | c |\n|---|---|\n| 2 | 3 |"
    assert run.last_table("| only |\n|---|") == "| only |\n|---|"  # at the very end
    assert run.last_table("no table at all\n") is None


# ----------------------------------------------------------------------------- the real subprocess path
def fake_script(path: Path, body: str) -> str:
    path.write_text("import sys\n" + body)
    return str(path)


@pytest.mark.slow
def test_failures_keep_their_old_block_and_exit_non_zero(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("42")
    ok = fake_script(tmp_path / "ok.py", "print('| early |')\nprint('progress')\n"
                     "print('| value | device |')\nprint('|---|---|')\n"
                     "print(f'| {open(sys.argv[1]).read()} | {sys.argv[2]} |')\n")
    crash = fake_script(tmp_path / "crash.py", "print('| partial |')\nsys.exit(3)\n")
    silent = fake_script(tmp_path / "silent.py", "print('done, but no table')\n")
    sections = [run.Section("x", crash, full="", quick=""),
                run.Section("y", silent, full="", quick=""),
                run.Section("ok", ok, full="{data}/in.txt {device} --slow", quick="{data}/in.txt {device}",
                            needs=("in.txt",))]
    out = tmp_path / "BENCHMARKS.md"
    out.write_bytes(DOC.encode())
    code = run.main(["--quick", "--out", str(out), "--data-dir", str(tmp_path), "--device", "cpu"], sections)
    assert code == 1
    new = out.read_bytes().decode()
    assert new.startswith(DOC)  # x and y untouched, prose byte for byte; ok appended at the end
    added = new[len(DOC):]
    assert f"Command: `python {ok} {tmp_path}/in.txt cpu`\n" in added
    assert "quick run" in added and "| 42 | cpu |" in added and "early" not in added
    report = capsys.readouterr().out
    assert "x: FAILED (exit status 3" in report and "y: FAILED (printed no table" in report
    assert "ok: ok" in report
    assert not list(tmp_path.glob(".BENCHMARKS.md.*"))  # no temporary file left behind


@pytest.mark.slow
def test_missing_data_stops_before_anything_runs(tmp_path):
    flag = tmp_path / "ran"
    script = fake_script(tmp_path / "touch.py", f"open({str(flag)!r}, 'w').close()\n")
    sections = [run.Section("a", script, full="", quick=""),
                run.Section("b", script, full="", quick="", needs=("absent.txt",))]
    code = run.main(["--out", str(tmp_path / "B.md"), "--data-dir", str(tmp_path), "--device", "cpu"], sections)
    assert code == 2 and not flag.exists() and not (tmp_path / "B.md").exists()


def test_unknown_section_is_a_usage_error():
    with pytest.raises(SystemExit):
        run.main(["--only", "nope", "--device", "cpu"])


# ----------------------------------------------------------------------------- the registry
class Parsed(Exception):
    """Raised in place of running the benchmark, once its parser has accepted the arguments."""


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("section", run.SECTIONS, ids=lambda s: s.name)
def test_every_command_parses_with_its_script(section, quick, monkeypatch):
    args = run.argv(section, quick, "DATA", "cpu")
    assert (ROOT / args[0]).is_file()
    # every data file the command names is declared, so a missing one is caught before any run
    named = {a.split("DATA/", 1)[1] for a in args if "DATA/" in a}
    assert named == set(section.needs)
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, a=None, namespace=None):
        raise Parsed(parse(self, a, namespace))  # a bad argument exits here, with argparse's message

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(Parsed) as stopped:
        load(Path(args[0]).stem).main()
    overrides = getattr(stopped.value.args[0], "overrides", None)
    if overrides:  # Hydra overrides: every key and group must exist
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            compose("train", overrides=overrides)


def test_section_names_are_unique():
    names = [s.name for s in run.SECTIONS]
    assert len(names) == len(set(names))


# ----------------------------------------------------------------------------- overhead.py on a classifier
def test_overhead_loops_run_a_classification_config(imdb_archive, tmp_path, one_thread):
    overhead = load("overhead")
    GlobalHydra.instance().clear()
    # ~recipe: the tiny model, not imdb_attention's
    cfg = overhead.config(3, ["data=imdb", "~recipe", *TINY["attention"], f"data.path={imdb_archive}",
                              f"data.cache_dir={tmp_path}", "data.batch_size=8", "data.min_freq=1",
                              "data.max_len=64", "trainer.progress=false", "trainer.device=cpu"])
    assert overhead.seqexp_loop(cfg) > 0  # no test evaluation: best.pt is never written
    assert overhead.hand_loop(cfg) > 0
    assert overhead.describe(cfg) == ("attention 2 x 32, 2 heads", f"{imdb_archive.name}, batch 8 x <= 64 tokens")


# ----------------------------------------------------------------------------- imdb.py
@pytest.mark.slow
def test_imdb_benchmark_trains_reads_and_reuses_runs(imdb_archive, tmp_path, capsys):
    """Two families side by side through scripts/train.py, read back from their events; a second
    call reads the finished runs instead of retraining, and a changed config retrains, keeping the
    old run aside."""
    imdb = load("imdb")
    GlobalHydra.instance().clear()
    cli = ["--data-path", str(imdb_archive), "--experiments", "imdb_ngram,imdb_rnn", "--quick", "--device", "cpu",
           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), f"data.cache_dir={tmp_path}",
           "data.min_freq=1", *REPORTS_OFF]  # the benchmark reads no report (nor compares them: comparable())
    imdb.main(cli)
    results = json.loads((tmp_path / "out" / "imdb_cpu_quick.json").read_text())
    assert [r["experiment"] for r in results] == ["imdb_ngram", "imdb_rnn"]
    for r in results:
        assert r["test_count"] == 24 and 0.0 <= r["test_acc"] <= 1.0  # every test review of the archive
        steps = [step for _, step, _ in r["curve"]]  # eval_every=2, max_steps=4 (both recipes run longer)
        assert steps == [2, 4]
        assert r["best_step"] in steps and r["best_at_s"] is not None
    assert results[1]["model"] == "BiRNN 1 x 128 per direction, max pooling"
    assert (tmp_path / "out" / "imdb_cpu_quick.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| `imdb_rnn` | BiRNN 1 x 128 per direction, max pooling |" in out

    GlobalHydra.instance().clear()
    stamp = (tmp_path / "runs" / "imdb_rnn" / "metrics.json").stat().st_mtime_ns
    imdb.main([*cli[:3], "imdb_rnn", *cli[4:]])
    assert "imdb_rnn: reusing" in capsys.readouterr().out
    assert (tmp_path / "runs" / "imdb_rnn" / "metrics.json").stat().st_mtime_ns == stamp

    GlobalHydra.instance().clear()  # how the run is watched is no change to what it trained
    imdb.main([*cli[:3], "imdb_rnn", *cli[4:], "logging.wrong_examples.count=3", "trainer.progress=true"])
    assert "imdb_rnn: reusing" in capsys.readouterr().out

    GlobalHydra.instance().clear()
    imdb.main([*cli[:3], "imdb_rnn", *cli[4:], "model.hidden_size=16"])
    assert "reusing" not in capsys.readouterr().out
    assert len(list((tmp_path / "runs").glob("imdb_rnn.old-*"))) == 1


def test_imdb_benchmark_describes_every_family():
    """Each experiment's row names its model's shape, not just its class."""
    imdb = load("imdb")
    GlobalHydra.instance().clear()
    rows = {name: imdb.describe(imdb.composed([f"experiment={name}"])) for name in imdb.EXPERIMENTS}
    assert rows["imdb_mingru"] == "Bi-minGRU 1 x 256 per direction (blocks), max pooling"
    assert rows["imdb_lstm"] == "BiLSTM 2 x 128 per direction, max pooling"
    assert all(" " in text for text in rows.values()), rows  # no bare class name left


def test_imdb_benchmark_config_comparison():
    same = load("imdb").same_config
    run = {"model": {"d": 64, "drop": 0.3}, "trainer": {"seed": 1}}
    assert same(run, {"model": {"d": 64, "drop": 0.3}, "trainer": {"seed": 1}})
    assert same(run, {"model": {"d": 64, "drop": 0.3, "word_dropout": 0.0}, "trainer": {"seed": 1}})  # added since, off
    assert not same(run, {"model": {"d": 64, "drop": 0.3, "word_dropout": 0.2}, "trainer": {"seed": 1}})
    assert not same(run, {"model": {"d": 128, "drop": 0.3}, "trainer": {"seed": 1}})
    assert not same(run, {"model": {"d": 64, "drop": 0.3}, "trainer": {"seed": 2}})


# ----------------------------------------------------------------------------- char_lm.py
char_lm = load("char_lm")


@pytest.mark.parametrize("preset", sorted(char_lm.PRESETS))
def test_every_char_lm_row_is_a_config_that_builds(preset, shakespeare):
    """A row's overrides are what a user copies into scripts/train.py: each composes, passes the
    checks that run before training, and builds its model and optimizer (optimizer=muon finds
    hidden matrices to take)."""
    for name, overrides in char_lm.PRESETS[preset].items():
        GlobalHydra.instance().clear()
        cfg = char_lm.config(["data=shakespeare", f"data.path={shakespeare}", *overrides])
        validate(cfg)
        data = build_data(cfg.data, seed=0)
        model = build_model(cfg.model, data.model_kwargs())
        assert build_optimizer(cfg.optimizer, model).param_groups, name


# ----------------------------------------------------------------------------- minrnn_throughput.py
@pytest.mark.slow
def test_minrnn_throughput_runs_as_a_script_for_the_new_families():
    """Its own process: the script composes train.yaml with nothing of seqexp imported but what it
    imports itself (it once lacked the root schema's registration and failed at its first compose)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "minrnn_throughput.py"), "--lengths", "8,16",
                        "--tokens", "32", "--rounds", "1", "--models", "gru,mamba,mamba_heads,deltanet"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split(" | ")[0] for row in rows] == ["| gru", "| mamba", "| mamba_heads", "| deltanet"]
    assert all(row.count("x)") == 2 for row in rows)  # a rate and a ratio at each length
