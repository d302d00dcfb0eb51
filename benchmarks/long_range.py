"""Long-range memory: how far back each model family carries what it read, task by task.

Every model family of configs/model/ (and attention with a sliding window) trains on each memory
task of the lab (data=copy, selective_copy, recall, adding) at each length of a grid, with one
fixed budget per cell: the same number of optimizer steps, batch and seed everywhere, so a
cell's numbers are a function of the seed, not of how busy the machine was (its wall time is
recorded beside them, and is not). A family whose model refuses a task (its `check_config`, or
its constructor, raises the one-line UserError a user would see) is left out of that task.

Reported per cell, on the held-out test split with the weights chosen on validation loss:
whole-answer exact match and per-token accuracy (copy, selective_copy, recall), MSE and the
trivial baseline's MSE (adding); steps, milliseconds per training step and train time. The
last printed table is what benchmarks/run.py pastes into BENCHMARKS.md; the plot (metric
against length, one panel per task, one line per model, and a panel of step time against
sequence length) goes to benchmarks/long_range_<grid>.png; every cell's result to
benchmarks/results/long_range_<grid>.json (git-ignored), which `--render` reads back without
training. A cell already in that JSON with the same overrides is reused (so an interrupted grid
continues where it stopped); `--fresh` retrains.

    python benchmarks/long_range.py                          # the CPU grid, 2 cells at a time, 1 thread each:
                                                             # ~20-25 min on 2 idle cores (estimated)
    python benchmarks/long_range.py --grid gpu --device cuda   # longer lengths, bigger models and budgets
    python benchmarks/long_range.py --models lstm,attention --tasks copy   # a slice of the grid
    python benchmarks/long_range.py --render                 # table and plot from the saved JSON
    python benchmarks/long_range.py --quick                  # a smoke test: tiny models, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seqexp.build import build_data, build_model
from seqexp.config import validate
from seqexp.configs import CONFIG_DIR
from seqexp.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # git-ignored
TASKS = ["copy", "selective_copy", "recall", "adding"]
# every model family that ships a config; one a later change adds joins the grid at its YAML's size
FAMILIES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))

# Model sizes per grid: small enough for the CPU grid, comparable in width (64-wide states;
# the vanilla RNN, whose step is cheapest, gets 128). Dropout off: every epoch is a fresh sample
# of the task (data.fresh=true), so there is nothing to overfit.
SIZES = {
    "small": {
        "rnn": ["model.hidden_size=128", "model.embed_dim=32", "model.num_layers=1"],
        "lstm": ["model.hidden_size=64", "model.embed_dim=32", "model.num_layers=1"],
        "gru": ["model.hidden_size=64", "model.embed_dim=32", "model.num_layers=1"],
        "attention": ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.dropout=0.0"],
        "mingru": ["model.hidden_size=64", "model.num_layers=2"],
        "minlstm": ["model.hidden_size=64", "model.num_layers=2"],
    },
    "large": {  # --grid gpu
        "rnn": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=1"],
        "lstm": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=2"],
        "gru": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=2"],
        "attention": ["model.d_model=128", "model.n_heads=4", "model.n_layers=4", "model.dropout=0.0"],
        "mingru": ["model.hidden_size=128", "model.num_layers=4"],
        "minlstm": ["model.hidden_size=128", "model.num_layers=4"],
    },
    "tiny": {  # --quick: does it run, not how well
        "rnn": ["model.hidden_size=16", "model.embed_dim=8"],
        "lstm": ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1"],
        "gru": ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1"],
        "attention": ["model.d_model=16", "model.n_heads=2", "model.n_layers=1"],
        "mingru": ["model.hidden_size=16", "model.num_layers=1"],
        "minlstm": ["model.hidden_size=16", "model.num_layers=1"],
    },
}

# A grid: the lengths per task (data.length: copy's gap, selective copy's noise, recall's whole
# sequence, adding's number of values), the budget and batch of every cell, and the window of
# the local-attention row. A stack of n layers with window W reads n x W positions back: the
# windowed row should solve the short cells and fail once the distance passes that reach (CPU:
# 2 x 16 = 32; copy's distance is T + 10, selective copy's up to T + 16, recall's up to T).
# Adding is a pooled classifier: every position reaches the pooled vector, window or not.
GRIDS = {
    "cpu": dict(sizes="small", steps=600, batch=32, eval_size=500, window=16,
                lengths={"copy": [10, 50, 200], "selective_copy": [16, 64, 256], "recall": [32, 64, 128],
                         "adding": [25, 100, 400]}),
    "gpu": dict(sizes="large", steps=5000, batch=64, eval_size=2000, window=32,
                  lengths={"copy": [50, 200, 1000, 2000], "selective_copy": [64, 256, 1024, 4096],
                           "recall": [64, 128, 256, 512], "adding": [100, 400, 1000, 2000]}),
    "quick": dict(sizes="tiny", steps=4, batch=8, eval_size=16, window=4,
                  lengths={"copy": [4, 8], "selective_copy": [4], "recall": [24], "adding": [6]}),
}


# ----------------------------------------------------------------------------- the cells
def rows(grid: dict, families: list[str]) -> dict[str, list[str]]:
    """Model rows of the table: name -> overrides; the windowed attention row after attention."""
    sizes, out = SIZES[grid["sizes"]], {}
    for f in families:
        out[f] = [f"model={f}", *sizes.get(f, [])]
        if f == "attention":
            out[f"attention (window {grid['window']})"] = [*out[f], f"model.window={grid['window']}"]
    return out


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def refusal(model: list[str], task: str, length: int) -> str | None:
    """The UserError a model gives for a task (its config checks, then its constructor on the
    data's runtime facts), or None: the model's own rules decide, no list of exceptions here."""
    try:
        cfg = compose_cfg([*model, f"data={task}", f"data.length={length}", "data.size=8", "data.eval_size=8",
                           "data.batch_size=8"])
        validate(cfg)
        build_model(cfg.model, build_data(cfg.data, seed=0).model_kwargs())
    except UserError as e:
        return str(e).splitlines()[0]
    return None


def cell_overrides(model: list[str], task: str, length: int, grid: dict, device: str) -> list[str]:
    steps = grid["steps"]
    every = max(1, steps // 2)  # 2 evaluations (half way, the end): the better one is tested
    # a fresh sample of the task every epoch of 64 batches: no example is seen twice
    return [*model, f"data={task}", f"data.length={length}", f"data.batch_size={grid['batch']}",
            f"data.size={64 * grid['batch']}", "data.fresh=true", f"data.eval_size={grid['eval_size']}",
            f"trainer.max_steps={steps}", f"trainer.eval_every={every}", f"trainer.checkpoint_every={every}",
            "trainer.keep_last=0", f"scheduler.warmup_steps={max(1, steps // 20)}", "trainer.progress=false",
            f"trainer.device={device}", "trainer.seed=0"]


def run_cell(cell: dict, threads: int | None) -> dict:
    """Train one cell (in this process, or a worker's); returns its result row."""
    from seqexp.train import train  # imported here: a spawned worker needs it, the parent may not

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(cell["run_dir"])
    if run_dir.exists():  # this benchmark's own scratch run of the same cell, superseded
        shutil.rmtree(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = train(compose_cfg(cell["overrides"]), run_dir)
    # CPU time of this process (all its threads): with one thread, about what the cell would take
    # on an idle core, however busy the machine was -- what sizes the grid
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    test = metrics["test"]  # the task's own metrics: a regression reports MSE, the others exact match
    score = ({"mse": test["test/mse"], "baseline_mse": test["test/baseline_mse"]} if "test/mse" in test
             else {"exact": test["test/exact"], "acc": test["test/acc"]})
    train_s = metrics["timing"]["train_time_s"]
    return {**cell, **score, "params": metrics["num_params"], "steps": metrics["steps"],
            "best_step": metrics["best_step"], "train_s": round(train_s, 2), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "ms_per_step": round(1000 * train_s / max(metrics["steps"], 1), 2), "threads": threads}


def plan(grid: dict, models: dict[str, list[str]], tasks: list[str], a) -> tuple[list[dict], list[str]]:
    cells, skipped = [], []
    for task in tasks:
        for name, model in models.items():
            lengths = grid["lengths"][task]
            why = refusal(model, task, lengths[0])
            if why:
                skipped.append(f"{name} on {task}: {why}")
                continue
            for L in lengths:
                slug = name.replace(" (window ", "_w").rstrip(")")
                # what the model reads (one batch generated to ask, not the cell's whole data)
                cfg = compose_cfg([*cell_overrides(model, task, L, grid, a.device), f"data.size={grid['batch']}",
                                   "data.eval_size=1"])
                seq_len = build_data(cfg.data, seed=0).model_kwargs()["max_len"]
                cells.append({"model": name, "task": task, "length": L, "seq_len": seq_len,
                              "overrides": cell_overrides(model, task, L, grid, a.device),
                              "run_dir": str(a.runs_dir / task / slug / f"L{L}")})
    return cells, skipped


def train_all(cells: list[dict], known: dict, a, save) -> list[dict]:
    """Cells not in `known` (same overrides) trained, `a.parallel` at a time; each result saved
    as it comes, so an interrupted grid keeps what it finished."""
    key = lambda c: (c["model"], c["task"], c["length"])
    done = {key(c): known[key(c)] for c in cells
            if not a.fresh and key(c) in known and known[key(c)]["overrides"] == c["overrides"]}
    # longest sequences first: the two workers then finish together, not waiting on one long cell
    todo = sorted((c for c in cells if key(c) not in done), key=lambda c: -c["seq_len"])
    print(f"{len(cells)} cells: {len(done)} reused from {a.json}, {len(todo)} to train "
          f"({a.parallel} at a time, {a.threads or torch.get_num_threads()} thread(s) each)", flush=True)

    def finished(r: dict) -> None:
        done[key(r)] = r
        score = f"mse {r['mse']:.4f}" if "mse" in r else f"exact {r['exact']:.3f}"
        print(f"{r['task']} L={r['length']} {r['model']}: {score}, {r['steps']} steps, {r['train_s']:.0f} s "
              f"({len(done)}/{len(cells)})", flush=True)
        save([done[key(c)] for c in cells if key(c) in done])

    if a.parallel <= 1:
        for c in todo:
            finished(run_cell(c, a.threads))
    else:  # spawned workers: a clean torch each, one thread each
        import multiprocessing
        with ProcessPoolExecutor(a.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in as_completed([pool.submit(run_cell, c, a.threads) for c in todo]):
                finished(f.result())
    return [done[key(c)] for c in cells]


# ----------------------------------------------------------------------------- the report
def score(r: dict) -> str:
    if "mse" in r:
        return f"{r['mse']:.4f} ({r['baseline_mse']:.3f})"
    return f"{r['exact']:.2f} ({r['acc']:.2f})"


def table(results: list[dict], grid: dict) -> str:
    """One row per task x model; a column per length (the i-th length of that task's grid)."""
    n = max(len(v) for v in grid["lengths"].values())
    head = ("| task: metric (lengths) | model | params | " + " | ".join(f"length {i + 1}" for i in range(n))
            + " | steps | ms / step | train time |")
    lines = [head, "|" + "---|" * (n + 6)]
    for task in TASKS:
        lengths = grid["lengths"][task]
        regression = any("mse" in r for r in results if r["task"] == task)
        metric = "test MSE (baseline MSE)" if regression else "test exact (token acc)"
        for model in dict.fromkeys(r["model"] for r in results if r["task"] == task):
            by_len = {r["length"]: r for r in results if r["task"] == task and r["model"] == model}
            cells = [f"T={L}: {score(by_len[L])}" if L in by_len else "-" for L in lengths] + ["-"] * (n - len(lengths))
            rs = [by_len[L] for L in lengths if L in by_len]
            join = lambda k, fmt: " / ".join(fmt(r[k]) for r in rs)
            lines.append(f"| {task}: {metric} ({', '.join(map(str, lengths))}) | {model} | "
                         f"{rs[0]['params'] / 1e3:.0f} k | " + " | ".join(cells) + f" | {rs[0]['steps']} | "
                         f"{join('ms_per_step', lambda v: f'{v:.0f}')} | {join('train_s', lambda v: f'{v:.0f} s')} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    for ax, task in zip(axes, TASKS):
        for m in models:
            rs = sorted((r for r in results if r["task"] == task and r["model"] == m), key=lambda r: r["length"])
            if not rs:
                continue
            # regression (adding): MSE over the baseline's (1: no better than the mean; 0: solved)
            y = [r["mse"] / r["baseline_mse"] if "mse" in r else r["exact"] for r in rs]
            ax.plot([r["length"] for r in rs], y, marker="o", c=colors[m], label=m,
                    ls="--" if "window" in m else "-")
        regression = any("mse" in r for r in results if r["task"] == task)
        ylabel = "test MSE / baseline MSE" if regression else "test exact match"
        ax.set(xscale="log", xlabel="data.length", ylabel=ylabel, title=task)
        ax.set_ylim(-0.05, None if regression else 1.05)
    ax = axes[-1]  # parallelism: what a training step costs as the sequence grows
    for m in models:
        pts = sorted({(r["seq_len"], r["ms_per_step"]) for r in results if r["model"] == m})
        if pts:
            ax.plot(*zip(*pts), marker=".", c=colors[m], label=m, ls="--" if "window" in m else "-")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms per training step",
           title="step time (every cell)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_as(a) -> str:
    return (torch.cuda.get_device_name() if a.device == "cuda" else
            f"CPU, {a.threads or torch.get_num_threads()} thread(s) per cell, {a.parallel} cell(s) at once")


def report(results: list[dict], grid: dict, a, skipped: list[str], run_as: str) -> None:
    plot(results, a.png, f"memory tasks, {grid['steps']} steps x batch {grid['batch']} per cell ({run_as})")
    total, cpu = sum(r["train_s"] for r in results), sum(r.get("cpu_s", 0) for r in results)
    print(f"\n{run_as}; torch {torch.__version__}; plot "
          f"{a.png.relative_to(ROOT) if a.png.is_relative_to(ROOT) else a.png}; results {a.json}")
    print(f"Every cell: {grid['steps']} AdamW steps of batch {grid['batch']} (fresh examples every epoch), "
          f"seed 0, {grid['eval_size']} test examples, weights chosen on validation loss. Sum of train times: "
          f"{total / 60:.1f} min; of the cells' CPU times (evaluation included): {cpu / 60:.1f} min.")
    for s in skipped:
        print(f"Left out: {s}")
    print()
    print(table(results, grid))


def main(cli: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=["cpu", "gpu"], default="cpu", help="gpu: longer lengths, bigger "
                   "models and budgets")
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps: does it run, not how well")
    p.add_argument("--models", default=None, help="comma-separated families (default: every configs/model/ one)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default=None, help="comma-separated lengths, for every chosen task (a slice)")
    p.add_argument("--steps", type=int, default=None, help="the budget of every cell (default: the grid's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parallel", type=int, default=None, help="cells at once (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: 1 on CPU)")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: outputs/long_range_<grid> (git-ignored)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true", help="table and plot from the saved JSON, no training")
    p.add_argument("--fresh", action="store_true", help="retrain cells the saved JSON already holds")
    a = p.parse_args(cli)
    name = "quick" if a.quick else a.grid
    grid = dict(GRIDS[name])
    if a.steps:
        grid["steps"] = a.steps
    if a.lengths:
        grid["lengths"] = {t: [int(x) for x in a.lengths.split(",")] for t in TASKS}
    if a.parallel is None:
        a.parallel = 2 if a.device == "cpu" and not a.quick else 1
    if a.threads is None and a.device == "cpu":
        a.threads = 1 if a.parallel > 1 or a.quick else None
    a.runs_dir = (a.runs_dir or ROOT / "outputs" / f"long_range_{name}").resolve()
    stem = f"long_range_{name}"
    a.json = a.out / f"{stem}.json"
    # the full grid's plot sits beside BENCHMARKS.md (tracked); a quick or redirected run's with its JSON
    a.png = (ROOT / "benchmarks" if name != "quick" and a.out == RESULTS else a.out) / f"{stem}.png"
    a.out.mkdir(parents=True, exist_ok=True)

    saved = json.loads(a.json.read_text()) if a.json.exists() else {"results": []}
    if a.render:
        results = saved["results"]
        if not results:
            raise SystemExit(f"{a.json}: no results to render; run without --render first")
        report(results, grid, a, saved.get("skipped", []), saved.get("run_as", "?"))
        return
    families = a.models.split(",") if a.models else FAMILIES
    tasks = a.tasks.split(",")
    cells, skipped = plan(grid, rows(grid, families), tasks, a)
    for s in skipped:
        print(f"left out: {s}", flush=True)
    known = {(r["model"], r["task"], r["length"]): r for r in saved["results"]}

    def save(results: list[dict]) -> None:
        # results of other slices (other models, tasks) kept: the JSON is the whole grid so far
        merged = {**known, **{(r["model"], r["task"], r["length"]): r for r in results}}
        tmp = a.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"grid": name, "run_as": run_as(a), "results": list(merged.values()),
                                   "skipped": skipped}, indent=1))
        os.replace(tmp, a.json)

    results = train_all(cells, known, a, save)
    report(results, grid, a, skipped, run_as(a))


if __name__ == "__main__":
    main()
