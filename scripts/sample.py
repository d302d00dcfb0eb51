#!/usr/bin/env python
"""`python scripts/sample.py --help`; the same as the console script seqexp-sample."""

from seqexp.commands.sample import main

if __name__ == "__main__":
    main()
