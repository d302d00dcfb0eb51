"""seqexp-ensemble RUN_or_SWEEP_DIR [RUN ...] [split=test] [weights=val] [device=cpu] [out=FILE]

Combine trained classifiers into one: the prediction is a weighted mean of their class
probabilities. Each run reads the reviews through its own pipeline (vocabulary, truncation),
so members can be any models trained on the same data and split (the same data fingerprint
and the same validation reviews). A sweep directory stands for its finished jobs.

weights=val (default) picks the weights on the validation split -- the simplex, in steps of
0.05, minimising the validation log-loss -- and then evaluates `split` once with them;
weights=equal averages. Prints each member's metrics and the ensemble's, and writes them as
JSON (default: ensemble_<split>.json in the directory the members share, e.g. the sweep dir).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from seqexp.errors import UserError, user_errors
from seqexp.evaluation import outputs
from seqexp.files import write_json
from seqexp.inference import build_data, load_run
from seqexp.options import parse
from seqexp.rundir import RunDir

GRID = 20  # weights are multiples of 1/GRID


@dataclass
class Options:
    split: str = field(default="test", metadata={"help": "the split to evaluate"})
    weights: str = field(default="val", metadata={"help": "val (fit on the validation split) or equal"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON file to write (default: beside the runs)"})


def expand(paths: list[str]) -> list[str]:
    """Run dirs and checkpoints as given; a sweep dir -> its jobs that have a checkpoint, in order."""
    runs = []
    for p in map(Path, paths):
        jobs = RunDir.with_checkpoints(p) if p.is_dir() and not RunDir(p).checkpoints.is_dir() else []
        runs += [str(j.path) for j in jobs] if jobs else [str(p)]
    return runs


def log_probs(model, data, split: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ((R, C) log-probabilities, (R,) labels) for every example of the split, in split order."""
    labels = data.labels(split)
    out = None
    for batch, logits in outputs(model, data.batches(split, stateful=model.stateful), device):
        lp = logits.float().log_softmax(-1).cpu()
        if out is None:
            out = torch.full((len(labels), lp.shape[1]), float("nan"))
        out[batch["rows"].cpu()] = lp
    assert not out.isnan().any(), "an example of the split was never served"
    return out, labels.clone()


def metrics(task, lp: torch.Tensor, labels: torch.Tensor) -> dict:
    """Log-probabilities -> the metrics a run of the task reports (loss, acc, confusion counts):
    the log-probabilities are logits whose softmax is the ensemble's distribution."""
    return task.metrics(task.batch_sums(lp, {"targets": labels}))


def mix(lps: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """log of the weighted mean of the members' probabilities."""
    stacked = torch.stack(lps)  # (K, R, C)
    w = torch.tensor(weights, dtype=stacked.dtype)[:, None, None]
    return torch.logsumexp(stacked + w.clamp(min=1e-12).log(), dim=0)


def simplex(k: int):
    """Every k-tuple of multiples of 1/GRID summing to 1."""
    for cut in itertools.product(range(GRID + 1), repeat=k - 1):
        if sum(cut) <= GRID:
            yield tuple(c / GRID for c in (*cut, GRID - sum(cut)))


def fit_weights(lps: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, ...]:
    """The weights on the simplex grid with the lowest log-loss (ties: the earliest)."""
    best, best_loss = None, float("inf")
    for w in simplex(len(lps)):
        loss = torch.nn.functional.nll_loss(mix(lps, w), labels).item()
        if loss < best_loss - 1e-12:
            best, best_loss = w, loss
    return best


def ensemble(paths: list[str], opts: Options, data_overrides: dict[str, str]) -> dict:
    runs = expand(paths)
    if len(runs) < 2:
        raise UserError("an ensemble needs at least two runs (or a sweep directory with two finished jobs).")
    if opts.weights not in ("val", "equal"):
        raise UserError(f"weights={opts.weights}: use weights=val or weights=equal.")
    splits = [opts.split] + (["val"] if opts.weights == "val" and opts.split != "val" else [])
    members, reference = [], None
    for path in runs:
        run = load_run(path, opts.device)
        run.require("classify", "an ensemble", "Give classifier runs (data=imdb).")
        data = build_data(run.ckpt, data_overrides)
        if not (data.can("examples") and data.can("labels")) or run.ckpt["model_kwargs"]["num_outputs"] < 2:
            raise UserError(f"{run.path}: an ensemble averages class probabilities over fixed, labelled examples; "
                            f"this run's data ({type(data).__name__}, task {data.task.name}) has none. "
                            f"Give classifier runs (data=imdb).")
        for split in splits:
            if split not in data.splits:
                raise UserError(f"{run.path}: this run's data has no '{split}' split.")
        # the same reviews in the same order: the same data content and the same reviews in each
        # split, compared as they are, whatever chose them (seed, val_fraction, val_split)
        fingerprint, rows = run.ckpt["data"].get("fingerprint"), {s: data.examples(s) for s in splits}
        if reference is None:
            reference = (fingerprint, rows, run.path)
        elif fingerprint != reference[0] or not all(torch.equal(rows[s], reference[1][s]) for s in splits):
            raise UserError(f"{run.path} was trained on other data or another validation split than "
                            f"{reference[2]}; ensemble runs of one dataset, trainer.seed, data.val_fraction "
                            f"and data.val_split.")
        members.append({"checkpoint": str(run.path), "step": run.step, "task": data.task,
                        "lp": {s: log_probs(run.model, data, s, run.device) for s in splits}})

    labels = members[0]["lp"][opts.split][1]
    if opts.weights == "val":
        weights = fit_weights([m["lp"]["val"][0] for m in members], members[0]["lp"]["val"][1])
    else:
        weights = tuple(1.0 / len(members) for _ in members)
    combined = mix([m["lp"][opts.split][0] for m in members], weights)

    def named(d: dict) -> dict:
        return {f"{opts.split}/{k}": v for k, v in d.items()}

    task = members[0]["task"]
    return {
        "split": opts.split,
        "weights_from": "val" if opts.weights == "val" else "equal",
        "members": [{"checkpoint": m["checkpoint"], "step": m["step"], "weight": w,
                     "metrics": named(metrics(task, *m["lp"][opts.split]))} for m, w in zip(members, weights)],
        "metrics": named(metrics(task, combined, labels)),
    }


def default_out(result: dict) -> Path:
    """ensemble_<split>.json in the deepest directory holding every member's run dir: the sweep
    dir for a sweep, not wherever the command happened to be run."""
    dirs = [str(RunDir.of(m["checkpoint"]).path.resolve()) for m in result["members"]]
    return Path(os.path.commonpath(dirs)) / f"ensemble_{result['split']}.json"


def table(result: dict) -> str:
    split = result["split"]
    lines = [f"| member | weight | {split}/acc | {split}/loss |", "|---|---|---|---|"]
    for m in result["members"]:
        lines.append(f"| {m['checkpoint']} (step {m['step']}) | {m['weight']:.2f} | "
                     f"{m['metrics'][f'{split}/acc']:.4f} | {m['metrics'][f'{split}/loss']:.4f} |")
    e = result["metrics"]
    lines.append(f"| **ensemble** (weights from {result['weights_from']}) | 1.00 | **{e[f'{split}/acc']:.4f}** | "
                 f"{e[f'{split}/loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        paths, opts, data_overrides = parse(sys.argv[1:] if argv is None else argv, Options, __doc__,
                                            prefixes=("data.",))
        result = ensemble(paths, opts, data_overrides)
        out = Path(opts.out) if opts.out else default_out(result)
        write_json(out, result)
        print(table(result))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
