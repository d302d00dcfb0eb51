"""Runs written by an earlier seqexp keep working: evaluate, sample, predict and resume them.

tests/fixtures/legacy/runs/ holds one tiny run per (task, model family), trained by
tests/fixtures/legacy/make_fixtures.py with seqexp at commit 293efe62bd33 and then frozen (see its
docstring; never regenerate them with a newer seqexp). Only public behaviour is used: the
command entry points and the `seqexp-train` CLI with `resume=`, their outputs and metrics.json.
The saved configs name the data where it was on the machine that made them, so every command
here passes `data.path` (and `data.cache_dir`) pointing at the fixture data, as a user whose
data moved would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import seqexp
from seqexp.commands import evaluate, predict, sample

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
CORPUS, ARCHIVE = FIXTURES / "corpus.txt", FIXTURES / "imdb_small.tar.gz"
RUNS = ["lm_rnn", "lm_lstm", "lm_gru", "lm_attention",
        "classify_rnn", "classify_lstm", "classify_gru", "classify_attention", "classify_ngram"]
LM = [r for r in RUNS if r.startswith("lm_")]
CLASSIFY = [r for r in RUNS if r.startswith("classify_")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models run fastest on one thread


def test_every_fixture_run_is_there():
    assert sorted(p.name for p in (FIXTURES / "runs").iterdir()) == sorted(RUNS)
    for name in RUNS:
        run = FIXTURES / "runs" / name
        for f in (".hydra/config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.json"):
            assert (run / f).is_file(), f"{name}: {f}"


def copy_run(name: str, tmp_path: Path) -> Path:
    """A writable copy: commands write next to the checkpoint, resume continues in place."""
    return Path(shutil.copytree(FIXTURES / "runs" / name, tmp_path / name))


def data_args(name: str, tmp_path: Path) -> list[str]:
    if name.startswith("lm_"):
        return [f"data.path={CORPUS}"]
    return [f"data.path={ARCHIVE}", f"data.cache_dir={tmp_path / 'cache'}"]


def saved_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def run_evaluate(run_or_ckpt: Path, name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"eval-{run_or_ckpt.name}.json"
    evaluate.main([str(run_or_ckpt), *data_args(name, tmp_path), f"out={out}"])
    return json.loads(out.read_text())


def assert_same_metrics(computed: dict, saved: dict) -> None:
    assert saved, "metrics.json has no metrics to compare"
    for key, value in saved.items():
        if isinstance(value, float):
            assert computed[key] == pytest.approx(value, abs=1e-5), key
        else:  # token and review counts, confusion counts
            assert computed[key] == value, key


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("name", RUNS)
def test_evaluate_reproduces_the_saved_metrics(name, tmp_path, capsys):
    run = copy_run(name, tmp_path)
    saved = saved_metrics(run)
    best = run_evaluate(run, name, tmp_path)  # a run directory means its best.pt
    assert Path(best["checkpoint"]).name == "best.pt" and best["step"] == saved["best_step"]
    assert_same_metrics(best["metrics"], saved["best"])
    assert best["metrics"]["val/loss"] == pytest.approx(saved["best"]["val/loss"], abs=1e-5)
    # last.pt holds the weights of the last validation: metrics.json's "final"
    last = run_evaluate(run / "checkpoints" / "last.pt", name, tmp_path)
    assert last["step"] == saved["steps"]
    assert_same_metrics(last["metrics"], saved["final"])
    assert "val/loss" in capsys.readouterr().out


# ----------------------------------------------------------------------------- sample / predict
SAMPLES = [("seeded", ["prompt=the ", "length=12", "seed=3"]), ("again", ["prompt=the ", "length=12", "seed=3"]),
           ("greedy", ["prompt=of", "length=8", "greedy=true", "num_samples=2"])]
SAMPLER = """
import sys
from seqexp.commands.sample import main
for run in sys.argv[1:]:
    for tag, argv in {samples!r}:
        print(f"=== {{run}} {{tag}}", flush=True)
        main([run, *argv])
"""


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def samples(tmp_path_factory) -> dict[tuple[str, str], str]:
    """{(run, tag): stdout} of `seqexp-sample` on every language model: one process for all, as
    the command writes to the stdout it was imported with (no capsys in-process)."""
    root = tmp_path_factory.mktemp("samples")
    runs = [str(copy_run(name, root)) for name in LM]
    src = str(Path(seqexp.__file__).resolve().parents[1])  # the seqexp under test, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", SAMPLER.format(samples=SAMPLES), *runs], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for block in r.stdout.split("=== ")[1:]:
        head, _, text = block.partition("\n")
        run, tag = head.rsplit(" ", 1)
        out[Path(run).name, tag] = text
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", LM)
def test_sample_from_a_legacy_language_model(name, samples, tmp_path):
    text = samples[name, "seeded"]
    assert text == samples[name, "again"]  # the same seed, the same text
    assert text.startswith("the ") and text.endswith("\n") and len(text) == len("the ") + 12 + 1
    greedy = samples[name, "greedy"].split("--- sample ")
    assert greedy[0] == "" and [g.split("\n", 1)[0] for g in greedy[1:]] == ["1 of 2 ---", "2 of 2 ---"]
    first, second = (g.split("\n", 1)[1] for g in greedy[1:])
    assert first == second and first.startswith("of") and len(first) == len("of") + 8 + 1  # greedy: identical
    with pytest.raises(SystemExit) as e:  # a language model cannot classify
        predict.main([str(copy_run(name, tmp_path)), "some text"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", CLASSIFY)
def test_predict_with_a_legacy_classifier(name, tmp_path, capsys):
    run = copy_run(name, tmp_path)
    texts = ["A wonderful, superb film!", "boring and awful, I hated the plot", "zzz unseen words only"]
    predict.main([str(run), *texts])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts)
    for line in lines:
        label, p = line.split("\t")
        assert label in ("neg", "pos") and 0.5 <= float(p) <= 1.0
    predict.main([str(run), *texts])
    assert capsys.readouterr().out.splitlines() == lines  # deterministic
    with pytest.raises(SystemExit) as e:  # a classifier cannot sample
        sample.main([str(run), "length=3"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", RUNS)
def test_resume_continues_a_legacy_run(name, tmp_path, cli):
    run = copy_run(name, tmp_path)
    before = saved_metrics(run)
    assert before["status"] == "finished"
    steps = before["steps"] + 2
    cli(f"resume={run}", *data_args(name, tmp_path), f"trainer.max_steps={steps}")  # exit 0: no SystemExit
    after = saved_metrics(run)
    assert after["status"] == "finished" and after["steps"] == steps and after["task"] == before["task"]
    assert after["num_params"] == before["num_params"]
    if before["task"] == "classify":
        assert "test" in after  # the test split, evaluated with best.pt's weights
    last = run_evaluate(run / "checkpoints" / "last.pt", name, tmp_path)  # the new last.pt loads and evaluates
    assert last["step"] == steps
    assert_same_metrics(last["metrics"], after["final"])


@pytest.mark.parametrize("name", ["lm_lstm", "classify_ngram"])
def test_resume_checks_a_legacy_run_against_its_saved_config_and_data(name, tmp_path, cli, capsys):
    """What the checkpoint recorded is read: a changed seed is refused, and so is data that moved
    and changed (its content fingerprint differs); nothing is trained."""
    run = copy_run(name, tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(f"resume={run}", *data_args(name, tmp_path), "trainer.seed=1")
    assert e.value.code == 2 and "trainer.seed: 1337 -> 1" in capsys.readouterr().err
    if name.startswith("lm_"):
        changed = tmp_path / "corpus.txt"
        changed.write_text(CORPUS.read_text().replace("the", "teh"))
        with pytest.raises(SystemExit) as e:
            cli(f"resume={run}", f"data.path={changed}", "trainer.max_steps=6")
        assert e.value.code == 2 and "not the data" in capsys.readouterr().err
    assert saved_metrics(run) == saved_metrics(FIXTURES / "runs" / name)


def test_a_config_saved_before_a_key_existed_is_read_as_that_version_ran(tmp_path):
    """IMDB runs saved before data.val_split existed drew their validation reviews at random:
    every reader of the checkpoint (resume, evaluate, ensemble) sees val_split=random."""
    import torch

    from seqexp.checkpoint import read

    path = copy_run("classify_lstm", tmp_path) / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert "digest" not in ckpt  # written by 293efe6
    del ckpt["config"]["data"]["val_split"]
    torch.save(ckpt, path)
    assert read(path)["config"]["data"]["val_split"] == "random"
    assert read(FIXTURES / "runs" / "classify_lstm" / "checkpoints" / "last.pt")["config"]["data"]["val_split"] \
        == "contiguous"
