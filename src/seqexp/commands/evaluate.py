"""seqexp-evaluate RUN_DIR_or_CHECKPOINT [split=val] [data.path=FILE] [device=cpu] [out=FILE]

Recompute a checkpoint's metrics with nothing but the checkpoint and the run's data source
(read from the saved config; `data.KEY=VALUE` overrides a key, e.g. the path of a moved copy).
Prints a table and writes the metrics as JSON (default: in the run directory, eval_<split>_<checkpoint>.json).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from seqexp.errors import UserError, user_errors
from seqexp.files import write_json
from seqexp.inference import build_data, load_run
from seqexp.options import parse
from seqexp.rundir import RunDir


@dataclass
class Options:
    split: str = field(default="val", metadata={"help": "the split to evaluate (char data: train, val)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON file to write (default: in the run dir)"})


def evaluate(path: str, opts: Options, data_overrides: dict[str, str]) -> dict:
    run = load_run(path, opts.device)
    data = build_data(run.ckpt, data_overrides)
    if opts.split not in data.splits:
        raise UserError(f"this run's data has no '{opts.split}' split; choose split={' or split='.join(data.splits)}.")
    batches = data.batches(opts.split, stateful=run.model.stateful)
    # fp32 on any device: the numbers do not depend on the precision the run trained with
    metrics = data.task.evaluate(run.model, batches, run.device, lambda: torch.autocast(run.device.type, enabled=False))
    return {
        "checkpoint": str(run.path),
        "step": run.step,
        "task": data.task.name,
        "split": opts.split,
        "data": getattr(data, "origin", None) or run.ckpt["config"]["data"]["_target_"],
        # named as in the run's record (`val/loss`, ...), so the two compare key by key
        "metrics": {f"{opts.split}/{k}": v for k, v in metrics.items()},
    }


def table(result: dict) -> str:
    rows = [("checkpoint", f"{result['checkpoint']} (step {result['step']})"),
            ("data", f"{result['data']}, split {result['split']}")]
    for k, v in result["metrics"].items():
        if isinstance(v, float):
            rows.append((k, f"{v:.4f}"))
        elif isinstance(v, int):
            rows.append((k, f"{v:,}"))
        else:  # the confusion matrix: rows true class, columns predicted
            rows.append((k, "  ".join(str(r) for r in v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        paths, opts, data_overrides = parse(sys.argv[1:] if argv is None else argv, Options, __doc__,
                                            prefixes=("data.",))
        if len(paths) != 1:
            raise UserError("give one run directory or checkpoint, e.g. seqexp-evaluate outputs/2026-01-01/12-00-00.")
        result = evaluate(paths[0], opts, data_overrides)
        ckpt = Path(result["checkpoint"])
        out = Path(opts.out) if opts.out else RunDir.of(ckpt).evaluation(opts.split, ckpt)
        write_json(out, result)
        print(table(result))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
