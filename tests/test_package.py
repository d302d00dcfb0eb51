"""The package as users install it: the wheel carries the configs, and an installed (not
editable) seqexp trains and runs its commands from a directory that is not the repository.

The wheel is built from a copy of the sources (a stale `build/` in the tree must not leak
into it), installed with `pip install --target` and put first on PYTHONPATH; the subprocesses
check that `seqexp` is imported from there, not from the editable install's `src/`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # a wheel built and installed, and its commands run in their own processes

CONFIGS = ROOT / "src" / "seqexp" / "configs"
TINY_RUN = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.device=cpu", "trainer.progress=false",
            "data.max_chars=20000", "data.batch_size=4", "data.seq_len=16",
            "model.hidden_size=16", "model.embed_dim=8", "logging.sample.chars=10"]


# In one process (torch is imported once): where seqexp and its configs are imported from, the
# distribution's console scripts, and calls of them, each loaded from its entry point and called
# with its arguments (sys.argv[2]: JSON [[name, argv], ...]); each call's exit status and output.
ENTRY_POINTS = """
import contextlib, importlib.resources, io, json, sys
from importlib.metadata import PathDistribution
from pathlib import Path
import seqexp

(info,) = Path(sys.argv[1]).glob("seqexp-*.dist-info")
scripts = {ep.name: ep for ep in PathDistribution(info).entry_points.select(group="console_scripts")}
calls = []
for name, argv in json.loads(sys.argv[2]):
    sys.argv = [name, *argv]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            scripts[name].load()()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    calls.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps({"module": seqexp.__file__, "configs": str(importlib.resources.files("seqexp.configs")),
                  "scripts": sorted(scripts), "calls": calls}))
"""
SCRIPTS = ["seqexp-ensemble", "seqexp-evaluate", "seqexp-lr-find", "seqexp-predict", "seqexp-sample", "seqexp-train"]


def pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args, "--quiet"],
                   cwd=cwd, check=True)


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the directory it is installed in)."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # offline: the build backend (setuptools, in the dev extra) is the one installed here
    pip("wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), cwd=source)
    (wheel,) = (tmp / "dist").glob("seqexp-*.whl")
    pip("install", "--no-deps", "--no-compile", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel, tmp / "site"


def run(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """A command with only the installed package on PYTHONPATH, started in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("SEQEXP_DEBUG", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_holds_every_config_file(installed):
    wheel, _ = installed
    shipped = {p.relative_to(ROOT / "src").as_posix() for p in CONFIGS.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert "seqexp/configs/train.yaml" in shipped and "seqexp/configs/model/lstm.yaml" in shipped
    names = set(zipfile.ZipFile(wheel).namelist())
    assert shipped <= names, f"not in the wheel: {sorted(shipped - names)}"


def entry_points(site: Path, cwd: Path, *calls: tuple[str, list[str]]) -> tuple[dict, list[dict]]:
    """ENTRY_POINTS in one process with only the installed package on PYTHONPATH."""
    r = run(site, cwd, sys.executable, "-c", ENTRY_POINTS, str(site), json.dumps(calls))
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.splitlines()[-1])
    return found, found["calls"]


def test_installed_seqexp_trains_and_runs_its_commands_anywhere(installed, tmp_path):
    _, site = installed
    train = run(site, tmp_path, str(site / "bin" / "seqexp-train"), *TINY_RUN)  # the installed script
    assert train.returncode == 0, train.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/*/*/metrics.json")  # the run dir is under the cwd
    run_dir = metrics.parent
    assert json.loads(metrics.read_text())["steps"] == 2
    assert (run_dir / "seqexp.log").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()

    # every console script with --help, then seqexp-evaluate on the run, in one process
    found, (*calls, evaluate) = entry_points(site, tmp_path, *((name, ["--help"]) for name in SCRIPTS),
                                             ("seqexp-evaluate", [str(run_dir)]))
    assert evaluate["code"] == 0, evaluate
    assert (run_dir / "eval_val_best.json").is_file()
    assert Path(found["module"]).is_relative_to(site), found["module"]  # not the editable src/
    assert Path(found["configs"]).is_relative_to(site), found["configs"]
    assert found["scripts"] == SCRIPTS
    usage = {name: call["out"] for name, call in zip(SCRIPTS, calls)}
    for name, call in zip(SCRIPTS, calls):
        assert not call["code"], (name, call)
        assert call["out"].startswith(name if name != "seqexp-train" else "seqexp is powered by Hydra"), (name, call)
    groups = usage["seqexp-train"].split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: " in groups and "schema" not in groups, groups  # read from the installed package


def test_a_family_added_inside_an_installed_copy_is_one_module_and_one_yaml(installed, tmp_path):
    """A new family in the package itself: its module in seqexp/models/, its YAML in
    seqexp/configs/model/, nothing else touched -- no list to extend, no recipe, no trust setting:
    it is chosen, checked, trained, evaluated and sampled like a shipped one."""
    _, installed_site = installed
    site = Path(shutil.copytree(installed_site, tmp_path / "site"))  # this test's own copy
    shutil.copy(ROOT / "tests" / "extension" / "conv_model.py", site / "seqexp" / "models" / "conv.py")
    (site / "seqexp" / "configs" / "model" / "conv.yaml").write_text(
        "# A causal convolution over embeddings: a family added to an installed seqexp.\n"
        "defaults:\n  - /schema/seqexp.models.conv.ConvModel@_here_\n  - _self_\n\ndim: 24\n")
    work = tmp_path / "work"
    work.mkdir()
    run_dir = work / "run"
    tiny = [a for a in TINY_RUN if not a.startswith(("model.hidden_size", "model.embed_dim"))]
    train = run(site, work, str(site / "bin" / "seqexp-train"), "model=conv", *tiny, f"hydra.run.dir={run_dir}")
    assert train.returncode == 0, train.stderr[-3000:]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved["num_params"] > 0
    # the rest through the same entry points, in one process (no SEQEXP_TRUST: it ships)
    _, (typo, evaluate, sample) = entry_points(site, work, ("seqexp-train", ["model=conv", "model.dimm=3"]),
                                               ("seqexp-evaluate", [str(run_dir)]),
                                               ("seqexp-sample", [str(run_dir), "length=5"]))
    assert typo["code"] == 2 and "model.dim" in typo["err"], typo  # its keys come from its constructor
    for done in (evaluate, sample):
        assert done["code"] == 0, done
    assert (run_dir / "eval_val_best.json").is_file()
