"""Data preparation: IMDB cold (archive -> cached token tensors) and warm (from the cache),
character corpora, and the time until the first training batch exists.

Each measurement builds the data object in a fresh process (imports excluded), so nothing is
shared between runs; cold runs get an empty cache directory each.

    python benchmarks/data_prep.py --imdb ../shared/data/aclImdb_v1_labeled.tar.gz \
        --text ../shared/data/tinyshakespeare.txt [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
kind, path, cache = sys.argv[1:4]
if kind == "imdb":
    from seqexp.data.imdb import ImdbData as cls
    kw = dict(path=path, cache_dir=cache)
else:
    from seqexp.data.char import CharData as cls
    kw = dict(path=None if path == "-" else path)
t0 = time.perf_counter()
data = cls(seed=0, **kw)
t1 = time.perf_counter()
batch = next(data.batches("train", stateful=kind == "char"))
t2 = time.perf_counter()
print(json.dumps({"build_s": t1 - t0, "first_batch_s": t2 - t1}))
"""


def measure(kind: str, path: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, path, cache], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str, runs: list[dict]) -> str:
    b = [r["build_s"] for r in runs]
    f = [r["first_batch_s"] for r in runs]
    return (f"| {name} | {statistics.median(b):.2f} | {min(b):.2f} | {max(b):.2f} | "
            f"{1000 * statistics.median(f):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imdb", help="aclImdb archive or directory")
    p.add_argument("--text", help="a UTF-8 text file for the char corpus")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = []
    if a.imdb:
        cold, warm = [], []
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as cache:
                cold.append(measure("imdb", a.imdb, cache))
                warm.append(measure("imdb", a.imdb, cache))
        rows += [row("IMDB cold: archive -> cached token tensors -> splits, vocabulary", cold),
                 row("IMDB warm: cached token tensors -> splits, vocabulary", warm)]
    with tempfile.TemporaryDirectory() as cache:
        rows.append(row("char: Python stdlib corpus (2 M characters)",
                        [measure("char", "-", cache) for _ in range(a.repeats)]))
        if a.text:
            rows.append(row(f"char: {a.text.rsplit('/', 1)[-1]}",
                            [measure("char", a.text, cache) for _ in range(a.repeats)]))
    print("\n| data | build s (median) | min | max | first batch ms (median) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
