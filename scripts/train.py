#!/usr/bin/env python
"""Train a model: `python scripts/train.py model=lstm data=char optimizer=adamw ...`.

Hydra's usual switches apply: `--cfg job` prints the composed config, `-m` runs a sweep.
"""

from seqexp.cli import train_main

if __name__ == "__main__":
    train_main()
