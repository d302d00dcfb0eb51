"""Commands that use a trained run: evaluate, sample, predict. Each is `main(argv)`, installed
as a console script (seqexp-evaluate, ...) and wrapped by a thin file in scripts/."""
