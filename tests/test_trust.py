"""Nothing read from a checkpoint or a run directory runs code (seqexp/trust.py).

Each attack is a real checkpoint of a short run whose stored config was edited, as someone
handing out a run directory could. Every command that reads a run must refuse it with one line,
exit code 2, and leave no trace: no file created or changed, no module imported.
"""

from __future__ import annotations

import copy
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqexp.commands import ensemble, evaluate, predict, sample
from seqexp.errors import UserError
from seqexp.resume import config_for_resume
from seqexp.train import train
from seqexp.trust import check_file_config
from tests.helpers import ROOT, imdb_overrides, make_cfg, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL_MODULE = "seqexp_test_evil_module"


class Payload:
    """Unpickling this creates `marker`: what a fully unpickled second file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def runs(tiny_text, imdb_archive, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.max_steps=2", "trainer.eval_every=2")), root / "lm")
    for name in ("clf", "clf2"):
        train(make_cfg(*imdb_overrides("gru", imdb_archive, root / "cache", "trainer.max_steps=2",
                                       "trainer.eval_every=2")), root / name)
    return {"lm": root / "lm", "clf": root / "clf", "clf2": root / "clf2"}


@pytest.fixture
def watched(tmp_path, monkeypatch) -> Path:
    """A directory that the attacks target, and a module there that marks its own import."""
    d = tmp_path / "watched"
    d.mkdir()
    (d / "victim.txt").write_text("precious")
    (d / f"{EVIL_MODULE}.py").write_text(f"from pathlib import Path\nPath({str(d / 'imported')!r}).touch()\n"
                                         f"def boom(*a, **k):\n    Path({str(d / 'called')!r}).touch()\n")
    monkeypatch.syspath_prepend(str(d))
    return d


def snapshot(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def attacks(d: Path, run: Path) -> dict[str, tuple[str, object]]:
    """name -> (dotted key to set in the saved config, value)."""
    victim = str(d / "victim.txt")
    payload = run / "payload.pkl"  # the second file of the run directory (written by `craft`)
    opener = {"_target_": "builtins.open", "file": victim, "mode": "w"}
    return {
        "top-level model target": ("model._target_", "builtins.print"),
        "top-level data target that imports": ("data._target_", f"{EVIL_MODULE}.boom"),
        "optimizer target outside seqexp": ("optimizer._target_", "torch.optim.lr_scheduler.LambdaLR"),
        "nested in model": ("model.cell", opener),
        "two deep in data": ("data.extra", {"inner": opener}),
        "in a list of the optimizer": ("optimizer.betas", [opener, 0.99]),
        "nested in scheduler": ("scheduler.warmup_steps", {"_target_": f"{EVIL_MODULE}.boom"}),
        "in the trainer": ("trainer.device", {"_target_": f"{EVIL_MODULE}.boom"}),
        "full unpickling of a second file": ("model.extra", {"_target_": "torch.load", "f": str(payload),
                                                             "weights_only": False}),
        "_partial_": ("model._partial_", True),
        "_args_": ("model.extra", {"_target_": "builtins.open", "_args_": [victim, "w"]}),
        "interpolation": ("data.path", "${oc.env:HOME}"),
    }


def craft(run: Path, key: str, value, out: Path, marker: Path) -> Path:
    """A copy of `run` whose checkpoints' stored config has `key` set to `value`."""
    shutil.copytree(run, out)
    (out / "payload.pkl").write_bytes(pickle.dumps(Payload(Path(marker))))
    for f in (out / "checkpoints").glob("*.pt"):
        ckpt = torch.load(f, weights_only=True)
        node = ckpt["config"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = copy.deepcopy(value)
        torch.save(ckpt, f)
    return out


def refused(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err, err
    return err


ATTACKS = list(attacks(Path("/x"), Path("/x")))


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_command_refuses_a_crafted_checkpoint_and_leaves_no_trace(attack, runs, watched, tmp_path, capsys):
    crafted = {}
    for name in ("lm", "clf"):
        key, value = attacks(watched, tmp_path / f"crafted_{name}")[attack]
        crafted[name] = craft(runs[name], key, value, tmp_path / f"crafted_{name}", watched / "unpickled")
    before = snapshot(watched, *crafted.values())

    refused(capsys, evaluate.main, [str(crafted["lm"])])
    refused(capsys, evaluate.main, [str(crafted["clf"])])
    refused(capsys, sample.main, [str(crafted["lm"]), "length=5"])
    refused(capsys, predict.main, [str(crafted["clf"]), "a fine film"])
    refused(capsys, ensemble.main, [str(crafted["clf"]), str(runs["clf2"]), f"out={tmp_path / 'e.json'}"])
    refused(capsys, ensemble.main, [str(runs["clf2"]), str(crafted["clf"]), f"out={tmp_path / 'e.json'}"])
    for run in crafted.values():  # resume=RUN, as the CLI builds it
        command = [f"resume={run}"]
        with pytest.raises(UserError, match="refused"):
            train(config_for_resume(make_cfg(*command), command), run)

    assert snapshot(watched, *crafted.values()) == before
    assert not (tmp_path / "e.json").exists()
    assert EVIL_MODULE not in sys.modules
    assert sorted(p.name for p in watched.iterdir()) == [f"{EVIL_MODULE}.py", "victim.txt"]


@pytest.mark.slow
def test_the_scripts_refuse_with_one_line_and_exit_2(runs, watched, tmp_path):
    """The real entry points, as a user would run them on a downloaded run directory."""
    key, value = attacks(watched, runs["lm"])["nested in model"]
    run = craft(runs["lm"], key, value, tmp_path / "downloaded", watched / "unpickled")
    before = snapshot(watched, run)
    for argv in (["scripts/evaluate.py", str(run)], ["scripts/train.py", f"resume={run}"]):
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "model.cell._target_" in p.stderr, p.stderr
    assert snapshot(watched, run) == before


def test_a_trusted_module_may_be_named(monkeypatch):
    cfg = {g: {"_target_": f"mylab.{g}.Thing"} for g in ("model", "data", "optimizer", "scheduler")}
    with pytest.raises(UserError, match="model._target_ 'mylab.model.Thing'"):
        check_file_config(cfg, "ckpt")
    monkeypatch.setenv("SEQEXP_TRUST", "mylab")
    check_file_config(cfg, "ckpt")
    monkeypatch.setenv("SEQEXP_TRUST", "mylabx, other")
    with pytest.raises(UserError):  # a prefix is a module path, not the start of a name
        check_file_config(cfg, "ckpt")
