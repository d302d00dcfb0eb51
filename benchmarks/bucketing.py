"""Length bucketing on IMDB: the share of padded positions in an epoch of training batches,
with bucketing (`data.bucket_chunks`, sort by length within chunks of that many batches) and
without it (bucket_chunks=1: random batches). Every padded position is compute a model spends
for nothing (the recurrent classifier runs over it on the CPU; attention masks it but still
pays for it), so this is the cost bucketing removes.

    python benchmarks/bucketing.py --imdb ../shared/data/aclImdb_v1_labeled.tar.gz [--max-lens 400,512]
"""

from __future__ import annotations

import argparse

from seqexp.data.imdb import ImdbData


def padding(data: ImdbData, epoch: int = 0) -> tuple[float, int]:
    """-> (padded share of all positions, positions) over one epoch of training batches."""
    padded = total = 0
    for b in data.batches("train", epoch=epoch):
        n = b["tokens"].numel()
        total, padded = total + n, padded + n - b["num_tokens"]
    return padded / total, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imdb", required=True, help="aclImdb archive or directory")
    p.add_argument("--max-lens", default="400,512")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunks", type=int, default=100, help="data.bucket_chunks with bucketing")
    a = p.parse_args()
    rows = []
    for max_len in map(int, a.max_lens.split(",")):
        kw = dict(seed=1337, path=a.imdb, max_len=max_len, batch_size=a.batch_size)
        off, n_off = padding(ImdbData(**kw, bucket_chunks=1))
        on, n_on = padding(ImdbData(**kw, bucket_chunks=a.chunks))
        rows.append(f"| {max_len} | {a.batch_size} | {100 * off:.1f}% | {100 * on:.1f}% | {n_off / n_on:.2f}x |")
    print(f"\n| max_len | batch | padding without bucketing | with (bucket_chunks={a.chunks}) | "
          "positions computed, without / with |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
