#!/usr/bin/env python
"""`python scripts/predict.py --help`; the same as the console script seqexp-predict."""

from seqexp.commands.predict import main

if __name__ == "__main__":
    main()
