"""Long-range memory: which model families remember, how far back, and why the others forget.

Every model family of configs/model/ -- a family a later change adds joins by its YAML alone --
plus a few variant rows (attention with a convolution, with a window, with other positions; the
controls of the new families) trains on each memory task of the lab (data=copy, selective_copy,
recall, induction, adding) at each length of a grid. A cell trains until the task is solved or
its step cap: both come from the task's data_defaults/<task>.yaml (trainer.target on val/exact,
trainer.max_steps), so steps decide, never seconds, and a cell's numbers are a function of the
seed (its times are recorded beside them, and are not). A family whose model refuses a task (its
`check_config` or constructor raises the one-line UserError a user would see) is left out of it.

Reported per cell: solved or not, and at which step and after how much training time; the test
split (and, for induction, the test split at 2x..16x the training length) on the final weights
-- the solving checkpoint when solved, else the cap's; the size of the state the model carries,
from the model itself (`SequenceModel.state_size`); the gradient-by-distance curve at the start
and at the end (reports/gradient_distance.py), of which the table shows a few distances.
A state-size axis adds recall at one length with each family narrower (the Zoology/Based
picture). The last printed table is what benchmarks/run.py pastes into BENCHMARKS.md; the
pictures (long_range_report.py) go beside it; every cell's result to
benchmarks/results/long_range_<grid>.json (git-ignored), which `--render` reads back without
training. A cell already in that JSON with the same overrides is reused (an interrupted grid
continues where it stopped); `--fresh` retrains.

    python benchmarks/long_range.py                          # the CPU grid, 2 cells at a time, 1 thread each
    python benchmarks/long_range.py --grid gpu --device cuda   # longer lengths, bigger models
    python benchmarks/long_range.py --models lstm,attention --tasks copy   # a slice of the grid
    python benchmarks/long_range.py --render                 # table and pictures from the saved JSON
    python benchmarks/long_range.py --quick                  # a smoke test: tiny models, a few steps

Sizes of every family for each grid are in SIZES below, the one place to change them; a family
not listed there trains at its own YAML's defaults (the plan says so), and is put on the state
axis once WIDTH names its width knob.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seqexp.build import build_data, build_model
from seqexp.config import validate
from seqexp.configs import CONFIG_DIR
from seqexp.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, however this one is loaded
from long_range_report import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # git-ignored
TASKS = ["copy", "selective_copy", "recall", "induction", "adding"]
# every model family that ships a config; one a later change adds joins the grid by its YAML
FAMILIES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))

# Model sizes per grid, the one place to change them: comparable widths (64-wide states; the
# vanilla RNN, whose step is cheapest, gets 128). Dropout off: every epoch is a fresh sample of
# the task (data.fresh=true), so there is nothing to overfit. mamba and deltanet: the families
# of a later change, sized here so that they join at the grid's width.
SIZES = {
    "small": {
        "rnn": ["model.hidden_size=128", "model.embed_dim=32", "model.num_layers=1"],
        "lstm": ["model.hidden_size=64", "model.embed_dim=32", "model.num_layers=1"],
        "gru": ["model.hidden_size=64", "model.embed_dim=32", "model.num_layers=1"],
        "attention": ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.dropout=0.0"],
        "mingru": ["model.hidden_size=64", "model.num_layers=2"],
        "minlstm": ["model.hidden_size=64", "model.num_layers=2"],
        "mamba": ["model.d_model=64", "model.num_layers=2"],
        "deltanet": ["model.d_model=64", "model.num_layers=2"],
    },
    "large": {  # --grid gpu
        "rnn": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=1"],
        "lstm": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=2"],
        "gru": ["model.hidden_size=256", "model.embed_dim=64", "model.num_layers=2"],
        "attention": ["model.d_model=128", "model.n_heads=4", "model.n_layers=4", "model.dropout=0.0"],
        "mingru": ["model.hidden_size=128", "model.num_layers=4"],
        "minlstm": ["model.hidden_size=128", "model.num_layers=4"],
        "mamba": ["model.d_model=128", "model.num_layers=4"],
        "deltanet": ["model.d_model=128", "model.num_layers=4"],
    },
    "tiny": {  # --quick: does it run, not how well
        "rnn": ["model.hidden_size=16", "model.embed_dim=8"],
        "lstm": ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1"],
        "gru": ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1"],
        "attention": ["model.d_model=16", "model.n_heads=2", "model.n_layers=1"],
        "mingru": ["model.hidden_size=16", "model.num_layers=1"],
        "minlstm": ["model.hidden_size=16", "model.num_layers=1"],
        "mamba": ["model.d_model=16", "model.num_layers=1"],
        "deltanet": ["model.d_model=16", "model.num_layers=1"],
    },
}
# the knob that sets a family's width, for the state-size axis (narrower copies of each row)
WIDTH = {"rnn": "hidden_size", "lstm": "hidden_size", "gru": "hidden_size", "mingru": "hidden_size",
         "minlstm": "hidden_size", "attention": "d_model", "mamba": "d_model", "deltanet": "d_model"}


@dataclass(frozen=True)
class Variant:
    """A row beside its family's: the same size plus `overrides`, on `tasks` only (where it
    answers a question; every cell costs). Rows of a family without a YAML are left out."""
    name: str
    family: str
    overrides: tuple[str, ...]
    tasks: tuple[str, ...]


def variants(grid: dict) -> list[Variant]:
    w, k = grid["window"], grid["conv"]
    return [
        # Zoology/Based: a short convolution makes recall learnable for attention; induction too
        Variant(f"attention + conv {k}", "attention", (f"model.conv_kernel={k}",), ("recall", "induction")),
        # reach n_layers x window: solves the short cells, fails once the distance passes it
        Variant(f"attention (window {w})", "attention", (f"model.window={w}",), ("copy",)),
        # positions that extend past the training length, for the extrapolation columns
        Variant("attention (sinusoidal)", "attention", ("model.positional=sinusoidal",), ("induction",)),
        Variant("attention (alibi)", "attention", ("model.positional=alibi",), ("induction",)),
        # the controls of the new families, where their one change is the question: selection off
        # (Mamba's selective copying), the decay gate off (plain DeltaNet's memory, on recall)
        Variant("mamba (selective=false)", "mamba", ("model.selective=false",), ("selective_copy",)),
        Variant("deltanet (gate=false)", "deltanet", ("model.gate=false",), ("recall",)),
    ]


# A grid: the lengths per task (data.length: copy's gap, selective copy's blanks, recall's and
# induction's whole sequence, adding's number of values; induction is also tested at 2x..16x),
# batch, evaluation size, the variants' window and convolution, and the state-size axis (recall
# at `state_length`, each row narrowed by `state_factors`). Caps and targets: data_defaults/.
# The CPU grid's lengths and caps come from pilots (BENCHMARKS.md, "How the CPU settings were
# chosen"): where a capable family solves the task within the cap, at a cost that keeps today's
# families within 30 minutes on 2 cores (with Mamba and DeltaNet: ~70, their scans' cost).
GRIDS = {
    "cpu": dict(sizes="small", batch=32, eval_size=500, window=16, conv=4, cap=None,
                state_length=64, state_factors=(0.5,),
                lengths={"copy": [10, 25, 60], "selective_copy": [16, 32, 64], "recall": [32, 64, 128],
                         "induction": [32], "adding": [16, 48, 128]}),
    "gpu": dict(sizes="large", batch=64, eval_size=2000, window=32, conv=4, cap=None,
                state_length=256, state_factors=(0.25, 0.5),
                lengths={"copy": [50, 200, 1000], "selective_copy": [64, 256, 1024], "recall": [64, 128, 256, 512],
                         "induction": [256], "adding": [100, 400, 1000]}),
    "quick": dict(sizes="tiny", batch=8, eval_size=16, window=4, conv=2, cap=4,
                  state_length=24, state_factors=(0.5,),
                  lengths={"copy": [4, 8], "selective_copy": [4], "recall": [24], "induction": [6], "adding": [6]}),
}
EXTRAPOLATE = (2, 4, 8, 16)  # induction: the test split again at these multiples of the training length


# ----------------------------------------------------------------------------- the rows
def rows(grid: dict, families: list[str]) -> dict[str, tuple[str, list[str], Optional[tuple]]]:
    """Model rows of the table: name -> (family, overrides, tasks or None for all); each variant
    right after its family's row."""
    sizes, out = SIZES[grid["sizes"]], {}
    for f in families:
        base = [f"model={f}", *sizes.get(f, [])]
        out[f] = (f, base, None)
        for v in variants(grid):
            if v.family == f:
                out[v.name] = (f, [*base, *v.overrides], v.tasks)
    return out


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def narrower(family: str, model: list[str], factor: float) -> Optional[list[str]]:
    """The row's overrides with its width knob times `factor` (None: the family has no WIDTH)."""
    if family not in WIDTH:
        return None
    key = f"model.{WIDTH[family]}"
    width = compose_cfg(model).model[WIDTH[family]]  # the row's size, or its YAML's default
    return [o for o in model if not o.startswith(key + "=")] + [f"{key}={max(1, round(width * factor))}"]


def cell_overrides(model: list[str], task: str, length: int, grid: dict, device: str) -> list[str]:
    B = grid["batch"]
    more = [f"data.eval_lengths=[{','.join(str(k * length) for k in EXTRAPOLATE)}]"] if task == "induction" else []
    if grid["cap"]:  # --quick: a few steps, evaluated at the end (else the task's cap, data_defaults/)
        more += [f"trainer.max_steps={grid['cap']}", f"trainer.eval_every={grid['cap']}", "scheduler.warmup_steps=1"]
    # a fresh sample of the task every epoch of 64 batches: no example is seen twice. The test
    # split is read once, on the final weights, by final_test() (not on best.pt: the last
    # checkpoint is the solving one when the target is reached, else the cap's weights).
    return [*model, f"data={task}", f"data.length={length}", f"data.batch_size={B}", f"data.size={64 * B}",
            "data.fresh=true", f"data.eval_size={grid['eval_size']}", *more, "logging.test_split.enabled=false",
            "logging.histograms.enabled=false", "logging.attention_maps.enabled=false", "trainer.progress=false",
            f"trainer.device={device}", "trainer.seed=0"]


def facts(overrides: list[str]) -> dict:
    """What the model reads and carries, from one small build (not the cell's data): sequence
    length, parameters, state size -- or the one-line refusal of a model that cannot do the task."""
    try:
        cfg = compose_cfg([*overrides, "data.size=8", "data.eval_size=1", "data.batch_size=8"])
        validate(cfg)
        data = build_data(cfg.data, seed=0)
        model = build_model(cfg.model, data.model_kwargs())
    except UserError as e:
        return {"refused": str(e).splitlines()[0]}
    seq_len = data.total_length(data.length)  # what training reads (the context may be longer: test@L)
    try:
        state = model.state_size(seq_len)
    except UserError as e:
        state = None
        print(f"state size: {str(e).splitlines()[0]}", flush=True)
    return {"seq_len": seq_len, "state_size": state,
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}


def plan(grid: dict, models: dict, tasks: list[str], a) -> tuple[list[dict], list[str]]:
    cells, skipped = [], []

    def add(name: str, family: str, model: list[str], task: str, L: int, width: Optional[float] = None) -> bool:
        over = cell_overrides(model, task, L, grid, a.device)
        f = facts(over)
        if "refused" in f:
            skipped.append(f"{name} on {task}: {f['refused']}")
            return False
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "").replace("+", "")
        sub = f"L{L}" if width is None else f"L{L}_x{width:g}"
        cells.append({"model": name, "family": family, "task": task, "length": L, "width": width, **f,
                      "overrides": over, "run_dir": str(a.runs_dir / task / slug / sub)})
        return True

    for task in tasks:
        for name, (family, model, only) in models.items():
            if only is not None and task not in only:
                continue
            for L in grid["lengths"][task]:
                if not add(name, family, model, task, L):
                    break  # a refusal is the family's, whatever the length
            # the state axis: recall at one length, the row narrowed (its own width is the cell above)
            if task == "recall" and (only is None or "recall" in only):
                for factor in grid["state_factors"]:
                    narrow = narrower(family, model, factor)
                    if narrow and any(c["model"] == name and c["task"] == task for c in cells):
                        add(name, family, narrow, task, grid["state_length"], factor)
    return cells, skipped


# ----------------------------------------------------------------------------- one cell
def final_test(run_dir: Path) -> dict:
    """The test split and its other lengths (test@L) on the final weights (last.pt)."""
    from seqexp.inference import build_data as data_of, load_run
    from seqexp.rundir import RunDir

    run = load_run(RunDir(run_dir).last, "cpu")
    data = data_of(run.ckpt)
    out = {}
    for split in (s for s in data.splits if s.split("@")[0] == "test"):
        m = data.task.evaluate(run.model, data.batches(split, stateful=run.model.stateful), run.device, nullcontext)
        out[split] = {k: v for k, v in m.items() if isinstance(v, float)}
    return out


def run_cell(cell: dict, threads: Optional[int]) -> dict:
    """Train one cell (in this process, or a worker's); returns its result row."""
    from seqexp.train import train  # imported here: a spawned worker needs it, the parent may not

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(cell["run_dir"])
    if run_dir.exists():  # this benchmark's own scratch run of the same cell, superseded
        shutil.rmtree(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    m = train(compose_cfg(cell["overrides"]), run_dir)
    test = final_test(run_dir)
    # CPU time of this process (all its threads): with one thread, about what the cell would take
    # on an idle core, however busy the machine was -- what sizes the grid
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    target, timing = m["target"] or {}, m["timing"]
    return {**cell, "solved": bool(target.get("reached")), "solved_step": target.get("step"),
            "solved_train_s": timing.get("target_train_time_s"), "steps": m["steps"], "test": test,
            "gradient": m.get("gradient_distance"), "train_s": round(timing["train_time_s"], 2),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "threads": threads,
            "ms_per_step": round(1000 * timing["train_time_s"] / max(m["steps"], 1), 2)}


def key(c: dict) -> tuple:
    return c["model"], c["task"], c["length"], c.get("width")


def train_all(cells: list[dict], known: dict, a, save) -> list[dict]:
    """Cells not in `known` (same overrides) trained, `a.parallel` at a time; each result saved
    as it comes, so an interrupted grid keeps what it finished."""
    done = {key(c): known[key(c)] for c in cells
            if not a.fresh and key(c) in known and known[key(c)]["overrides"] == c["overrides"]}
    # longest sequences first: the two workers then finish together, not waiting on one long cell
    todo = sorted((c for c in cells if key(c) not in done), key=lambda c: -c["seq_len"])
    print(f"{len(cells)} cells: {len(done)} reused from {a.json}, {len(todo)} to train "
          f"({a.parallel} at a time, {a.threads or torch.get_num_threads()} thread(s) each)", flush=True)

    def finished(r: dict) -> None:
        done[key(r)] = r
        verdict = f"solved at step {r['solved_step']}" if r["solved"] else f"not solved in {r['steps']} steps"
        print(f"{r['task']} L={r['length']} {r['model']}{'' if r['width'] is None else ' x' + str(r['width'])}: "
              f"{verdict}, {r['train_s']:.0f} s ({len(done)}/{len(cells)})", flush=True)
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


def run_as(a) -> str:
    return (torch.cuda.get_device_name() if a.device == "cuda" else
            f"CPU, {a.threads or torch.get_num_threads()} thread(s) per cell, {a.parallel} cell(s) at once")


def main(cli: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=["cpu", "gpu"], default="cpu", help="gpu: longer lengths, bigger models")
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps: does it run, not how well")
    p.add_argument("--models", default=None, help="comma-separated families (default: every configs/model/ one)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default=None, help="comma-separated lengths, for every chosen task (a slice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parallel", type=int, default=None, help="cells at once (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: 1 on CPU)")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: outputs/long_range_<grid> (git-ignored)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true", help="table and pictures from the saved JSON, no training")
    p.add_argument("--fresh", action="store_true", help="retrain cells the saved JSON already holds")
    a = p.parse_args(cli)
    name = "quick" if a.quick else a.grid
    grid = dict(GRIDS[name])
    if a.lengths:
        grid["lengths"] = {t: [int(x) for x in a.lengths.split(",")] for t in TASKS}
    if a.parallel is None:
        a.parallel = 2 if a.device == "cpu" and not a.quick else 1
    if a.threads is None and a.device == "cpu":
        a.threads = 1 if a.parallel > 1 or a.quick else None
    a.runs_dir = (a.runs_dir or ROOT / "outputs" / f"long_range_{name}").resolve()
    stem = f"long_range_{name}"
    a.json = a.out / f"{stem}.json"
    # the full grid's pictures sit beside BENCHMARKS.md (tracked); a quick or redirected run's with its JSON
    a.pictures = ROOT / "benchmarks" if name != "quick" and a.out == RESULTS else a.out
    a.out.mkdir(parents=True, exist_ok=True)

    saved = json.loads(a.json.read_text()) if a.json.exists() else {"results": []}
    if a.render:
        if not saved["results"]:
            raise SystemExit(f"{a.json}: no results to render; run without --render first")
        report(saved["results"], grid, a, saved.get("skipped", []), saved.get("run_as", "?"), name, TASKS, EXTRAPOLATE)
        return
    families = a.models.split(",") if a.models else FAMILIES
    cells, skipped = plan(grid, rows(grid, families), a.tasks.split(","), a)
    for s in skipped:
        print(f"left out: {s}", flush=True)
    for f in dict.fromkeys(c["family"] for c in cells if c["family"] not in SIZES[grid["sizes"]]):
        print(f"model={f}: not in SIZES[{grid['sizes']!r}], trained at its own YAML's defaults", flush=True)
    known = {key(r): r for r in saved["results"]}

    def save(results: list[dict]) -> None:
        # results of other slices (other models, tasks) kept: the JSON is the whole grid so far
        merged = {**known, **{key(r): r for r in results}}
        tmp = a.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"grid": name, "run_as": run_as(a), "results": list(merged.values()),
                                   "skipped": sorted({*saved.get("skipped", []), *skipped})}, indent=1))
        os.replace(tmp, a.json)

    results = train_all(cells, known, a, save)
    report(results, grid, a, skipped, run_as(a), name, TASKS, EXTRAPOLATE)


if __name__ == "__main__":
    main()
