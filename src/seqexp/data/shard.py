"""One rank's share of any data object's batches: rows [rank * B // W, (rank + 1) * B // W).

Wraps the batches() contract (dicts with tokens/targets/lengths/carry/num_tokens), so every
data kind shards the same way without knowing about processes:
- training: `data.batch_size` stays the global batch. Stateful BPTT batches hold chunk i of
  every stream, so a rank owns the same streams in every batch; window and classification
  batches are split by rows. `loss_scale` (world_size x this rank's share of the batch's loss
  terms) makes DDP's average of per-rank mean losses the mean over the global batch, even
  when the shares differ (a short last batch). `batch_terms` (the global batch's loss terms)
  weighs a micro-batch within an accumulated step the same on every rank.
- evaluation: each rank takes its rows too; metrics are sums, added over ranks once
  (Trainer.evaluate), so they cover the split exactly once. A rank left with no rows skips
  the batch (evaluation runs the plain module: no collective in it).
"""

from __future__ import annotations

from typing import Iterator

import torch

from seqexp.distributed import rows
from seqexp.errors import UserError


class Sharded:
    """`data` as seen by one rank; everything but batches() is the wrapped object's."""

    def __init__(self, data, rank: int, world_size: int):
        self.data, self.rank, self.world_size = data, rank, world_size

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        for batch in self.data.batches(split, stateful=stateful, epoch=epoch, start=start):
            n = batch["tokens"].shape[0]
            s = rows(n, self.rank, self.world_size)
            if s.start == s.stop:
                if split == "train":  # every rank must take every step: DDP's all-reduce waits for all
                    raise UserError(f"a training batch of {n} rows cannot be split over {self.world_size} "
                                    f"processes; use a data.batch_size that is a multiple of {self.world_size}.")
                continue
            part = {k: v[s] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                    for k, v in batch.items()}
            task = self.data.task  # it knows what a token and a loss term are in its batches
            part["num_tokens"] = task.num_tokens(part)
            if split == "train":
                total = task.loss_terms(batch)
                part["loss_scale"] = self.world_size * task.loss_terms(part) / total if total else 1.0
                part["batch_terms"] = total  # weighs this batch among a step's micro-batches (trainer.accumulate)
            yield part
