#!/usr/bin/env python
"""`python scripts/ensemble.py --help`; the same as the console script seqexp-ensemble."""

from seqexp.commands.ensemble import main

if __name__ == "__main__":
    main()
