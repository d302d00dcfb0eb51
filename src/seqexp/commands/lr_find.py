"""seqexp-lr-find [--steps 200] [--min-lr 1e-6] [--max-lr 1] [--diverge 4] [--plot lr_find.png] OVERRIDES...

The learning-rate range test (seqexp/lr_find.py) on the config `scripts/train.py OVERRIDES` would
train: the same checks, data, model, optimizer and training step, with the learning rate rising
exponentially from --min-lr to --max-lr. Prints the suggested lr and writes the plot; writes
nothing else (no run directory, no checkpoint).

    seqexp-lr-find data=shakespeare model=gru trainer.device=cpu --steps 200
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from seqexp.errors import UserError, user_errors


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every seqexp command's mistakes
        raise UserError(f"{message} (see --help).")


def arguments(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="seqexp-lr-find", add_help=False)
    p.add_argument("--steps", type=int, default=200, help="steps at most (default 200)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the first step's lr (default 1e-6)")
    p.add_argument("--max-lr", type=float, default=1.0, help="the last step's lr (default 1)")
    p.add_argument("--diverge", type=float, default=4.0,
                   help="stop once the smoothed loss exceeds this multiple of its best (default 4)")
    p.add_argument("--plot", default="lr_find.png", help="the plot's file (default lr_find.png, here)")
    p.add_argument("--version", action="store_true", help="print seqexp's version")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
    if {"-h", "--help"} & set(argv):  # the docstring first, as every seqexp command's help
        print(__doc__.strip() + "\n\n" + p.format_help().split("\n\n", 1)[1])
        sys.exit(0)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    with user_errors():
        args = arguments(sys.argv[1:] if argv is None else argv)
        if args.version:
            from seqexp.options import version_line

            print(version_line())
            return
        from seqexp.cli import compose_train

        plot_path = Path(args.plot)
        if not plot_path.parent.is_dir():  # refused before the minutes of training, not after
            raise UserError(f"--plot {plot_path}: the folder {plot_path.parent} does not exist.")
        cfg = compose_train(args.overrides)
        from seqexp.lr_find import plot, range_test

        result = range_test(cfg, steps=args.steps, min_lr=args.min_lr, max_lr=args.max_lr, diverge=args.diverge)
        for line in result.lines():
            print(line)
        print(f"plot: {plot(result, plot_path)}")


if __name__ == "__main__":
    main()
