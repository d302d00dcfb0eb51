#!/usr/bin/env python
"""`python scripts/evaluate.py --help`; the same as the console script seqexp-evaluate."""

from seqexp.commands.evaluate import main

if __name__ == "__main__":
    main()
