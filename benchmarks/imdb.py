"""IMDB accuracy against training time, one row per model family.

Trains each experiment config with the command a user would type (`scripts/train.py
experiment=NAME data.path=...`), side by side (`--parallel`, each run `--threads` threads: on
a 2-core CPU one thread per run gives about the throughput of two, so two runs at once halve
the time), then reads each run's TensorBoard events and metrics.json:
- the validation accuracy at every evaluation against the training time so far (evaluation
  excluded), as a table and a PNG plot;
- the test accuracy of the checkpoint chosen on validation, the one test evaluation a run makes.

A finished run whose composed config equals the one asked for is read, not retrained, so the
table can be regenerated from the runs of the README's commands; `--fresh` retrains.

    python benchmarks/imdb.py --data-path ../shared/data/aclImdb_v1_labeled.tar.gz
    python benchmarks/imdb.py --data-path ... --experiments imdb_lstm,imdb_gru --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.build import locate
from seqexp.configs import CONFIG_DIR
from seqexp.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# one row per model family: every model config (configs/model/NAME.yaml) that has an IMDB
# experiment named after it (configs/experiment/imdb_NAME.yaml); a new family's pair joins the table
EXPERIMENTS = sorted(f"imdb_{m.stem}" for m in (CONFIG_DIR / "model").glob("*.yaml")
                     if (CONFIG_DIR / "experiment" / f"imdb_{m.stem}.yaml").is_file())
# a smoke test: a few steps on short reviews (the test split is still evaluated in full)
QUICK = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2", "data.max_len=32"]


def overrides(name: str, a) -> list[str]:
    # wrong_examples=0: listing the worst validation reviews costs a pass and is not measured here
    return [f"experiment={name}", f"data.path={a.data_path}", "trainer.progress=false",
            "logging.wrong_examples.count=0", f"trainer.device={a.device}", *(QUICK if a.quick else []), *a.overrides]


def comparable(cfg) -> dict:
    """A config as a dict, its data path made absolute (`../shared/...` and `/abs/shared/...` are one
    file) and trainer.device=auto made what it picks here. Without what only watches a run -- the
    progress bar and `logging.*`, which a resume may change too: they change neither the weights nor
    the train time, only the time spent evaluating (part of the wall time) -- nor trainer.keep_last."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("logging", None)
    d["trainer"].pop("progress", None)
    d["trainer"].pop("keep_last", None)  # how many step checkpoints stay on disk: not how the run trains
    if d["trainer"]["device"] == "auto":
        d["trainer"]["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if d["data"].get("path"):
        d["data"]["path"] = os.path.realpath(ROOT / d["data"]["path"])  # train.py runs from the repo root
    return d


def composed(args: list[str]) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return comparable(compose("train", overrides=args))


def same_config(saved, wanted) -> bool:
    """Equal, except that a key one side lacks counts as equal at its off value (0, false, null):
    a setting added to seqexp after a run was made, left off, does not make the run stale."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return all(same_config(saved[k], wanted[k]) if k in saved and k in wanted
                   else not (saved.get(k) if k in saved else wanted.get(k))
                   for k in saved.keys() | wanted.keys())
    return saved == wanted


def finished_with(run: Path, args: list[str]) -> bool:
    """Did `run` finish, trained with the config these overrides compose to now?"""
    try:
        done = (RunDir(run).read_metrics() or {}).get("status") == "finished"
        saved = comparable(OmegaConf.load(RunDir(run).config))
    except (OSError, KeyError, ValueError):
        return False
    return done and same_config(saved, composed(args))


def command(args: list[str], run: Path, threads: int | None) -> str:
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    return f"{env}python scripts/train.py {shlex.join([*args, f'hydra.run.dir={run}'])}"


def train_all(names: list[str], a) -> dict[str, Path]:
    """Train what is missing, `a.parallel` at a time; returns each experiment's run directory."""
    runs, todo = {}, []
    for name in names:
        run = a.runs_dir / name
        runs[name] = run
        if not a.fresh and finished_with(run, overrides(name, a)):
            print(f"{name}: reusing the finished run in {run}", flush=True)
            continue
        if run.exists():  # never delete a run: move it aside
            run.rename(run.with_name(f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
        todo.append(name)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < a.parallel:
            name = todo.pop(0)
            ov = overrides(name, a)
            print(f"{name}: {command(ov, runs[name], a.threads)}", flush=True)
            runs[name].parent.mkdir(parents=True, exist_ok=True)
            log = open(runs[name].parent / f"{name}.log", "w")
            running[name] = (subprocess.Popen([sys.executable, "scripts/train.py", *ov, f"hydra.run.dir={runs[name]}"],
                                              cwd=ROOT, env=env,
                                              stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(1.0)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                log.close()
                print(f"{name}: exit {proc.returncode} (log: {runs[name].parent / f'{name}.log'})", flush=True)
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"training failed for {', '.join(failed)}; see their logs in {a.runs_dir}")
    return runs


def describe(cfg: dict) -> str:
    """The model in one line, as its family describes a config of itself (SequenceModel.describe)."""
    return locate(cfg["model"]["_target_"]).describe(cfg["model"])


def read_run(name: str, run: Path) -> dict:
    metrics = RunDir(run).read_metrics()
    cfg = OmegaConf.to_container(OmegaConf.load(RunDir(run).config), resolve=True)
    events = EventAccumulator(str(run)).Reload()
    clock = {e.step: e.value for e in events.Scalars("time/train_s")}  # logged at every evaluation
    curve = [(round(clock[e.step], 1), e.step, e.value) for e in events.Scalars("val/acc") if e.step in clock]
    return {
        "experiment": name, "model": describe(cfg), "params": metrics["num_params"], "steps": metrics["steps"],
        "epochs": metrics["epochs"], "best_step": metrics["best_step"],
        "best_val_acc": metrics["best"]["val/acc"], "test_acc": metrics["test"]["test/acc"],
        "test_count": metrics["test"]["test/count"], "train_s": metrics["timing"]["train_time_s"],
        "wall_s": metrics["timing"]["wall_time_s"], "best_at_s": clock.get(metrics["best_step"]),
        "curve": curve, "run_dir": str(run),
    }


def minutes(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        t, _, v = zip(*r["curve"])
        (line,) = ax.plot([x / 60 for x in t], [100 * x for x in v], marker="o", ms=3,
                          label=f"{r['experiment']}: test {100 * r['test_acc']:.2f}%")
        if r["best_at_s"] is not None:  # the tested checkpoint, at the training time it was saved
            ax.plot(r["best_at_s"] / 60, 100 * r["test_acc"], marker="*", ms=12, c=line.get_color(), ls="none")
    ax.set(xlabel="training time (min), evaluation excluded", ylabel="accuracy (%)", title=title)
    ax.set_ylim(bottom=max(50.0, ax.get_ylim()[0]))
    ax.legend(title="line: validation; star: test (chosen checkpoint)", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(cli: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="the IMDB archive or an extracted aclImdb directory")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS))
    p.add_argument("--runs-dir", type=Path, default=None, help="default: outputs/imdb_bench[_quick] (git-ignored)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS per run (default: 1 on CPU with --parallel > 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few steps each: does it run, not how well")
    p.add_argument("--fresh", action="store_true", help="retrain even where a finished run matches")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every run, e.g. data.cache_dir=...")
    a = p.parse_args(cli)
    if not os.path.isabs(a.data_path):  # the runs start in the repo root
        a.data_path = os.path.relpath(os.path.abspath(a.data_path), ROOT)
    if a.threads is None and a.device == "cpu" and a.parallel > 1:
        a.threads = 1
    if a.device == "cuda":
        a.parallel, a.threads = 1, None  # one GPU: runs side by side would time each other
    suffix = "_quick" if a.quick else ""
    a.runs_dir = (a.runs_dir or ROOT / "outputs" / f"imdb_bench{suffix}").resolve()
    names = a.experiments.split(",")
    runs = train_all(names, a)
    results = [read_run(n, runs[n]) for n in names]

    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"imdb_{a.device}{suffix}"
    (a.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    run_as = "one run at a time" if a.device == "cuda" else (
        f"{a.threads or torch.get_num_threads()} thread(s) per run, {a.parallel} run(s) at once")
    hw = f"{torch.cuda.get_device_name()}, {run_as}" if a.device == "cuda" else f"CPU, {run_as}"
    png = (ROOT / "benchmarks" if not a.quick else a.out) / f"{stem}.png"
    plot(results, png, f"IMDB, {hw}")
    print(f"\n{hw}; torch {torch.__version__}; plot {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    print("Validation curve: accuracy at each evaluation (training minutes); test: the checkpoint chosen on "
          "validation, evaluated once on all test reviews.\n")
    print("| experiment | model | params | test acc | best val acc | chosen at (train time) | train time | "
          "wall time | run as | validation acc over training time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        curve = ", ".join(f"{100 * v:.1f} ({t / 60:.0f}')" for t, _, v in r["curve"])
        print(f"| `{r['experiment']}` | {r['model']} | {r['params'] / 1e6:.2f} M | **{100 * r['test_acc']:.2f}%** "
              f"| {100 * r['best_val_acc']:.2f}% | {minutes(r['best_at_s'])} | {minutes(r['train_s'])} | "
              f"{minutes(r['wall_s'])} | {run_as} | {curve} |")


if __name__ == "__main__":
    main()
