"""A sweep's results: summary.md and summary.csv (one row per job, best first) and two plots.

Everything is read back from the job directories (rundir.py) -- the overrides Hydra saved, the record,
the TensorBoard events -- so the summary can be rebuilt at any time, also while a sweep runs
(`python scripts/summarize.py SWEEP_DIR`) or after it was interrupted.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Directories Hydra made a job in, in job-number order."""
    dirs = [run.path for run in RunDir.jobs(sweep_dir)]

    def order(d: Path):
        m = re.match(r"(\d+)_", d.name)
        return (int(m.group(1)) if m else math.inf, d.name)

    return sorted(dirs, key=order)


def load_job(job_dir: Path, sweep_dir: Path) -> dict:
    run = RunDir(job_dir)
    metrics = run.read_metrics() or {}
    return {
        "dir": job_dir,
        "job": job_dir.relative_to(sweep_dir).as_posix() if job_dir != sweep_dir else job_dir.name,
        "overrides": [str(o) for o in OmegaConf.load(run.overrides)],
        "metrics": metrics,
        # Hydra made the directory but the job has not evaluated yet (or was killed before)
        "status": metrics.get("status", "running"),
    }


def swept_params(jobs: list[dict]) -> dict[str, list[str]]:
    """Override keys whose value differs between jobs, with each job's value ('' when unset)."""
    per_job = [dict(o.split("=", 1) for o in j["overrides"] if "=" in o) for j in jobs]
    keys = list(dict.fromkeys(k for d in per_job for k in d))
    values = {k: [d.get(k, "") for d in per_job] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def objective_of(jobs: list[dict]) -> tuple[str, str]:
    for j in jobs:
        obj = j["metrics"].get("objective")
        if obj:
            return obj["metric"], obj["mode"]
    return "val/loss", "min"


def test_metrics(metrics: dict) -> dict:
    test = metrics.get("test")
    if isinstance(test, (int, float)):
        return {"test": test}
    if not isinstance(test, dict):
        return {}
    return {(k if k.startswith("test") else f"test/{k}"): v for k, v in test.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def target_columns(metrics: dict) -> dict:
    """trainer.target: the step and training seconds to it (empty when not reached); nothing without one."""
    target = metrics.get("target")
    if not target:
        return {}
    return {"target step": target["step"] if target["reached"] else None,
            "target train_s": (metrics.get("timing") or {}).get("target_train_time_s")}


def build_rows(jobs: list[dict]) -> tuple[list[dict], str, str]:
    metric, mode = objective_of(jobs)
    params = swept_params(jobs)
    rows = []
    for i, j in enumerate(jobs):
        m = j["metrics"]
        rows.append({
            "job": j["job"],
            "status": j["status"],
            "overrides": " ".join(j["overrides"]),
            **{k: v[i] for k, v in params.items()},
            f"best {metric}": (m.get("objective") or {}).get("best"),
            f"final {metric}": (m.get("final") or {}).get(metric),
            **test_metrics(m),
            **target_columns(m),
            "best_step": m.get("best_step"),
            "steps": m.get("steps"),
            "wall_time_s": (m.get("timing") or {}).get("wall_time_s"),
            "num_params": m.get("num_params"),
            "error": m.get("error", ""),
        })

    def key(row):  # trainer.target: the fastest to it first; then best objective; jobs without one last
        if row.get("target step") is not None:
            return (-1, row["target step"])
        v = row[f"best {metric}"]
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return (1, 0.0)
        return (0, v if mode == "min" else -v)

    return sorted(rows, key=key), metric, mode


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_markdown(rows: list[dict], path: Path, sweep_dir: Path, metric: str, mode: str,
                   params: list[str]) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    # the swept parameters get a column each; the full override list (shared values, paths)
    # would push them out of view, so it is left to summary.csv
    cols = [c for c in rows[0] if c != "overrides" or not params]
    cols = [c for c in cols if c != "error" or any(r["error"] for r in rows)]
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
             + ("sorted by the steps to trainer.target, then " if any(r.get("target step") for r in rows)
                else "sorted by ")
             + f"best {metric} ({'lower' if mode == 'min' else 'higher'} is better).", "",
             "| " + " | ".join(["#", *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for rank, r in enumerate(rows, 1):
        cells = [fmt(r.get(c)).replace("|", "\\|").replace("\n", " ")[:120] for c in cols]
        lines.append("| " + " | ".join([str(rank), *cells]) + " |")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- seeds
SEED = "trainer.seed"


def seed_groups(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Finished jobs that differ only in trainer.seed, as one row per group: for the best
    objective and each test metric, the mean, the sample standard deviation and the count.
    Empty when no seed was swept (a one-seed comparison has no error bar to give)."""
    if not any(f"{SEED}=" in r["overrides"] for r in rows):
        return []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "finished":
            rest = " ".join(sorted(o for o in r["overrides"].split() if not o.startswith(f"{SEED}=")))
            groups.setdefault(rest, []).append(r)
    out = []
    for rest, members in groups.items():
        row = {"group": rest or "(no other override)", "seeds": len(members)}
        for col in [f"best {metric}", *(k for k in members[0] if k.startswith("test/"))]:
            values = [m[col] for m in members if isinstance(m.get(col), (int, float)) and math.isfinite(m[col])]
            if values:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
                row[f"{col} mean"], row[f"{col} std"] = mean, math.sqrt(var)
        out.append(row)
    key, sign = f"best {metric} mean", 1 if mode == "min" else -1
    return sorted(out, key=lambda r: sign * r[key] if key in r else math.inf)  # best first


def seeds_markdown(groups: list[dict], metric: str) -> list[str]:
    if not groups:
        return []
    cols = [c for c in groups[0] if c.endswith(" mean")]
    lines = ["", f"## Across seeds ({SEED}): mean ± standard deviation over the finished seeds", "",
             "| group | seeds | " + " | ".join(c.removesuffix(" mean") for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for g in groups:
        cells = [f"{fmt(g[c])} ± {fmt(g[c.removesuffix(' mean') + ' std'])}" if c in g else "" for c in cols]
        lines.append(f"| {g['group'][:120]} | {g['seeds']} | " + " | ".join(cells) + " |")
    return lines


def plot_seeds(groups: list[dict], metric: str, path: Path) -> bool:
    """The best objective of each group: mean with a ±1 standard deviation error bar."""
    from matplotlib.figure import Figure

    col = f"best {metric}"
    groups = [g for g in groups if f"{col} mean" in g]
    if not groups:
        return False
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 1), 3.8), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(range(len(groups)), [g[f"{col} mean"] for g in groups], yerr=[g[f"{col} std"] for g in groups],
                fmt="o", capsize=4)
    ax.set_xticks(range(len(groups)), [f"{g['group'][:40]}\n(n={g['seeds']})" for g in groups], rotation=30,
                  ha="right", fontsize="small")
    ax.set(ylabel=col, title=f"{col} across seeds (mean ± std)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- plots
def read_curve(job_dir: Path, tag: str) -> Optional[tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file
    acc = EventAccumulator(str(job_dir), size_guidance={"scalars": 0}).Reload()
    if tag not in acc.Tags().get("scalars", []):
        return None
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def plot_curves(jobs: list[dict], metric: str, path: Path) -> bool:
    from matplotlib.figure import Figure  # object API: no pyplot state, no display needed

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for j in jobs:
        curve = read_curve(j["dir"], metric)
        if curve:
            ax.plot(*curve, marker="o", markersize=3, label=j["job"][:60])
            drawn += 1
    if not drawn:
        return False
    ax.set(xlabel="step", ylabel=metric, title=f"{metric}, every job")
    ax.grid(alpha=0.3)
    if drawn <= 20:
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=110)
    return True


def plot_params(rows: list[dict], params: list[str], metric: str, path: Path) -> bool:
    from matplotlib.figure import Figure

    col = f"best {metric}"
    done = [r for r in rows if isinstance(r[col], (int, float)) and math.isfinite(r[col])]
    if not params or not done:
        return False
    fig = Figure(figsize=(4 * len(params), 3.6), layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, p in zip(axes, params):
        raw, y = [r[p] for r in done], [r[col] for r in done]
        try:
            x = [float(v) for v in raw]
            ax.scatter(x, y)
            if min(x) > 0 and max(x) / min(x) >= 10:
                ax.set_xscale("log")
        except ValueError:  # categorical: a group choice, a string
            cats = sorted(set(raw))
            ax.scatter([cats.index(v) for v in raw], y)
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set(xlabel=p, ylabel=col)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return True


def write_summary(sweep_dir: Path) -> dict[str, Path]:
    """Write the summary files into `sweep_dir`; returns what was written by name."""
    sweep_dir = Path(sweep_dir)
    jobs = [load_job(d, sweep_dir) for d in find_jobs(sweep_dir)]
    if not jobs:
        return {}
    rows, metric, mode = build_rows(jobs)
    params = list(swept_params(jobs))
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    write_csv(rows, out["csv"])
    write_markdown(rows, out["md"], sweep_dir, metric, mode, params)
    groups = seed_groups(rows, metric, mode)
    if groups:
        out["seeds"] = sweep_dir / "summary_seeds.csv"
        write_csv(groups, out["seeds"])
        with open(out["md"], "a") as f:
            f.write("\n".join(seeds_markdown(groups, metric)) + "\n")
    try:
        if plot_curves(jobs, metric, sweep_dir / "val_curves.png"):
            out["curves"] = sweep_dir / "val_curves.png"
        if plot_params(rows, params, metric, sweep_dir / "objective_vs_params.png"):
            out["params"] = sweep_dir / "objective_vs_params.png"
        if groups and plot_seeds(groups, metric, sweep_dir / "seeds.png"):
            out["seeds_plot"] = sweep_dir / "seeds.png"
    except ImportError as e:
        log.warning("plots skipped: %s (pip install matplotlib)", e)
    return out
