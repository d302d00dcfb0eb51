"""The long-range memory grid's report (benchmarks/long_range.py): one table and four pictures.

- the table: a row per task x model, a column per length (induction: the training length, then
  the test split at 2x..16x it), each cell "solved at step N" or not, with its test metric on the
  final weights; the state the model carries at the longest length, the gradient-by-distance
  at the end at a few distances (why a family failed), ms per step and train time. The state-
  size axis adds a row per model: recall at one length, by width.
- long_range_<grid>.png: the test metric against the length, one panel per task, and the step
  time of every cell against its sequence length;
- ..._extrapolation.png: induction, exact match against the test length (trained at the first);
- ..._state.png: recall against the numbers of state the model carries (Zoology's Figure 2 axis);
- ..._gradients.png: every row's gradient-by-distance curve on copy at its longest length, at
  the start and at the end of training.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

GRADIENT_AT = (1, 16, 64)  # distances shown in the table (those within the sequence)


# ----------------------------------------------------------------------------- numbers
def test_at(r: dict, L: int | None = None) -> dict:
    """The test metrics of a cell at its training length, or at test length L (induction)."""
    return r["test"]["test" if L in (None, r["length"]) else f"test@{L}"]


def score(r: dict) -> str:
    """exact (token acc), or for adding acc (MSE / the baseline's MSE)."""
    t = test_at(r)
    if "mse" in t:
        return f"{t['acc']:.2f} (MSE {t['mse']:.3f} / {t['baseline_mse']:.3f})"
    return f"{t['exact']:.2f}" + ("" if r["task"] == "induction" else f" ({t['acc']:.2f})")


def verdict(r: dict) -> str:
    return f"✓ {score(r)} @{r['solved_step']}" if r["solved"] else f"✗ {score(r)}"


def count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e4 else f"{n:,}"


def gradient_at(r: dict, stage: str = "end") -> list[tuple[int, float]]:
    """(distance, mean norm) at GRADIENT_AT within the cell's sequence; none without the picture."""
    norms = (r.get("gradient") or {}).get(stage, {}).get("norm") or []
    return [(d, norms[d]) for d in GRADIENT_AT if d < len(norms) and norms[d] is not None]


# ----------------------------------------------------------------------------- the table
def joined(rs: list[dict], key: str, fmt) -> str:
    return " / ".join(fmt(r[key]) for r in rs)


def table(results: list[dict], grid: dict, tasks: list[str], extrapolate: tuple) -> str:
    main = [r for r in results if r.get("width") is None]
    n = max([len(v) for v in grid["lengths"].values()] + [1 + len(extrapolate)])
    head = ("| task (lengths) | model | params | state | " + " | ".join(f"length {i + 1}" for i in range(n))
            + f" | ∇ at d = {' / '.join(map(str, GRADIENT_AT))} | ms / step | train time |")
    lines = [head, "|" + "---|" * (n + 7)]
    ms, secs = (lambda v: f"{v:.0f}"), (lambda v: f"{v:.0f} s")
    for task in tasks:
        lengths = grid["lengths"][task]
        for model in dict.fromkeys(r["model"] for r in main if r["task"] == task):
            by_len = {r["length"]: r for r in main if r["task"] == task and r["model"] == model}
            rs = [by_len[L] for L in lengths if L in by_len]
            if task == "induction":  # one training length, then the same weights tested longer
                r = rs[0]
                cells = [f"T={r['length']}: {verdict(r)}"] + [
                    f"T={k * r['length']}: {test_at(r, k * r['length'])['exact']:.2f}" for k in extrapolate]
                label = f"{task} ({r['length']}; tested to {extrapolate[-1]}x)"
            else:
                cells = [f"T={L}: {verdict(by_len[L])}" if L in by_len else "-" for L in lengths]
                label = f"{task} ({', '.join(map(str, lengths))})"
            last = rs[-1]
            grads = " / ".join(f"{v:.0e}" for _, v in gradient_at(last)) or "-"
            lines.append(f"| {label} | {model} | {count(rs[0]['params'])} | {count(last['state_size'])} | "
                         + " | ".join(cells + ["-"] * (n - len(cells)))
                         + f" | {grads} | {joined(rs, 'ms_per_step', ms)} | {joined(rs, 'train_s', secs)} |")
    for L in sorted({r["length"] for r in results if r.get("width") is not None}):
        # the state-size axis: each model narrowed, and at its own width, on recall at L
        for model in dict.fromkeys(r["model"] for r in results if r.get("width") is not None and r["length"] == L):
            rs = sorted((r for r in results if r["model"] == model and r["task"] == "recall" and r["length"] == L),
                        key=lambda r: r["width"] or 1.0)
            cells = [f"x{r['width'] or 1:g}, state {count(r['state_size'])}: {verdict(r)}" for r in rs]
            lines.append(f"| recall by width (T={L}) | {model} | {joined(rs, 'params', count)} | - | "
                         + " | ".join(cells + ["-"] * (n - len(cells)))
                         + f" | - | {joined(rs, 'ms_per_step', ms)} | {joined(rs, 'train_s', secs)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures
def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def style(models: list[str]) -> dict[str, dict]:
    """One colour per model, the same in every picture; variants dashed. tab20's ten dark hues, then
    its ten light ones: a grid of more than ten rows still gives each its own colour."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    palette = [tab20[2 * k] for k in range(10)] + [tab20[2 * k + 1] for k in range(10)]
    return {m: {"c": palette[i % 20], "ls": "--" if "(" in m or "+" in m else "-"} for i, m in enumerate(models)}


def plot_lengths(results: list[dict], grid: dict, tasks: list[str], path: Path, title: str, styles: dict) -> None:
    plt = pyplot()
    main = [r for r in results if r.get("width") is None]
    panels = [t for t in tasks if t != "induction"]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.4 * (len(panels) + 1), 4.2), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for m, st in styles.items():
            rs = sorted((r for r in main if r["task"] == task and r["model"] == m), key=lambda r: r["length"])
            if rs:  # adding: the rows within 0.04 (acc); the others whole answers (exact)
                y = [test_at(r).get("exact", test_at(r)["acc"]) for r in rs]
                ax.plot([r["length"] for r in rs], y, marker="o", label=m, **st)
                solved = [(r["length"], yy) for r, yy in zip(rs, y) if r["solved"]]
                if solved:
                    ax.plot(*zip(*solved), ls="", marker="*", ms=11, c=st["c"])
        ax.set(xscale="log", xlabel="data.length", ylabel="test acc" if task == "adding" else "test exact match",
               title=f"{task} (* solved)", ylim=(-0.05, 1.05))
    ax = axes[0][-1]  # what a training step costs as the sequence grows
    for m, st in styles.items():
        pts = sorted({(r["seq_len"], r["ms_per_step"]) for r in main if r["model"] == m})
        if pts:
            ax.plot(*zip(*pts), marker=".", label=m, **st)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms per training step",
           title="step time (every cell)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_extrapolation(results: list[dict], extrapolate: tuple, path: Path, title: str, styles: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, st in styles.items():
        for r in (r for r in results if r["task"] == "induction" and r["model"] == m and r.get("width") is None):
            xs = [r["length"] * k for k in (1, *extrapolate)]
            ax.plot(xs, [test_at(r, x)["exact"] for x in xs], marker="o" if r["solved"] else "x", label=m, **st)
            ax.axvline(r["length"], c="grey", lw=0.8)
    ax.set(xscale="log", xlabel="test length (trained at the grey line)", ylabel="test exact match",
           ylim=(-0.05, 1.05), title="induction heads: length extrapolation (x: not solved at the training length)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_state(results: list[dict], L: int, path: Path, title: str, styles: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, st in styles.items():
        rs = sorted((r for r in results if r["model"] == m and r["task"] == "recall" and r["length"] == L
                     and r["state_size"]), key=lambda r: r["state_size"])
        if rs:
            ax.plot([r["state_size"] for r in rs], [test_at(r)["exact"] for r in rs], marker="o", label=m, **st)
    ax.set(xscale="log", xlabel="state the model carries (numbers per sequence; attention: its key-value cache)",
           ylabel="recall test exact match", ylim=(-0.05, 1.05), title=f"recall at T={L} against state size, by width")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gradients(results: list[dict], task: str, L: int, path: Path, title: str, styles: dict) -> None:
    """Two panels, start and end: each row's mean |d loss / d input| against the distance back.
    Exact zeros (beyond a window's reach) cannot sit on a log axis: marked x at the bottom."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    rs = [r for r in results if r["task"] == task and r["length"] == L and r.get("width") is None and r.get("gradient")]
    positive = [v for r in rs for s in ("start", "end") for v in r["gradient"][s]["norm"] if v]
    floor = min(positive) / 10 if positive else 1e-12
    for ax, stage in zip(axes, ("start", "end")):
        for r in rs:
            y = torch.tensor([math.nan if v is None else v for v in r["gradient"][stage]["norm"]], dtype=torch.float64)
            d = torch.arange(len(y))
            pos, zero = y > 0, y == 0
            ax.plot(d[pos], y[pos], label=f"{r['model']}{' (solved)' if r['solved'] else ''}", **styles[r["model"]])
            if zero.any():
                ax.plot(d[zero], torch.full((int(zero.sum()),), floor), "x", c=styles[r["model"]]["c"], ms=3)
        step = "step 0" if stage == "start" else "the last step"
        ax.set(yscale="log", xlabel="distance back from the answer (positions)", title=f"{task}, T={L}: {step}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean |d loss / d input embedding|")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the whole report
def report(results: list[dict], grid: dict, a, skipped: list[str], run_as: str, name: str, order: list[str],
           extrapolate: tuple) -> None:
    """Print the table, draw the pictures. `order`: the tasks in table order; `extrapolate`: the
    multiples of induction's training length it was tested at."""
    tasks = [t for t in order if any(r["task"] == t for r in results)]
    styles = style(list(dict.fromkeys(r["model"] for r in results)))
    stem = a.pictures / f"long_range_{name}"
    extra = "long_range" if name == "cpu" else f"long_range_{name}"  # the CPU grid's: BENCHMARKS.md's names
    title = f"memory tasks, trained to val/exact 0.99 or the cap, batch {grid['batch']} ({run_as})"
    plot_lengths(results, grid, tasks, stem.with_suffix(".png"), title, styles)
    pictures = [stem.with_suffix(".png")]
    if "induction" in tasks:
        pictures.append(a.pictures / f"{extra}_extrapolation.png")
        plot_extrapolation(results, extrapolate, pictures[-1], title, styles)
    if any(r.get("width") is not None for r in results):
        pictures.append(a.pictures / f"{extra}_state.png")
        plot_state(results, grid["state_length"], pictures[-1], title, styles)
    if "copy" in tasks:  # the longest copy gap that was trained: where the recurrences fail
        L = max(r["length"] for r in results if r["task"] == "copy")
        pictures.append(a.pictures / f"{extra}_gradients.png")
        plot_gradients(results, "copy", L, pictures[-1], title, styles)
    total, cpu = sum(r["train_s"] for r in results), sum(r.get("cpu_s", 0) for r in results)
    shown = [str(p.relative_to(a.pictures)) for p in pictures]
    print(f"\n{run_as}; torch {torch.__version__}; pictures {', '.join(shown)} in {a.pictures}; results {a.json}")
    print(f"Every cell: AdamW (lr 2e-3, cosine) on batches of {grid['batch']}, fresh examples every epoch, seed 0, "
          f"until val/exact reaches 0.99 (adding: val/acc, rows within 0.04) at an evaluation (every 100 steps) or the "
          f"task's cap (data_defaults/<task>.yaml); test split ({grid['eval_size']} examples) on the final weights. "
          f"Sum of train times: {total / 60:.1f} min; of the cells' CPU times (evaluation included): {cpu / 60:.1f} min.")
    for s in skipped:
        print(f"Left out: {s}")
    print()
    print(table(results, grid, tasks, extrapolate))
