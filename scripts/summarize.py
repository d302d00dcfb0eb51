#!/usr/bin/env python
"""Summarize a sweep: `python scripts/summarize.py outputs/multirun/<date>/<time>`.

Writes summary.md, summary.csv, val_curves.png and objective_vs_params.png into the sweep
directory and prints the table. Works while the sweep runs and after it was interrupted.
"""

import argparse
import sys
from pathlib import Path

from seqexp.sweep.summary import write_summary


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (hydra.sweep.dir)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        fail(f"{args.sweep_dir} is not a directory.")
    written = write_summary(args.sweep_dir)
    if not written:
        fail(f"no jobs in {args.sweep_dir} (no */.hydra/overrides.yaml below it).")
    print(written["md"].read_text())
    for path in written.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
