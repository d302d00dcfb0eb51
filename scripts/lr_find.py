#!/usr/bin/env python
"""`python scripts/lr_find.py --help`; the same as the console script seqexp-lr-find."""

from seqexp.commands.lr_find import main

if __name__ == "__main__":
    main()
