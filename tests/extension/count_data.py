"""A dataset from outside the package with a task of its own (count_task.py): sequences of ids
2..vocab-1 with 0..max_count copies of token 1 put at random places; the target is how many.
Generated from the seed, no files; every example fixed, so runs of it can be ensembled."""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch

from seqexp.data.base import Dataset
from seqexp.errors import require
from tests.extension.count_task import Counting


class CountData(Dataset):
    task = Counting()

    def __init__(self, *, seed: int, saved: Optional[dict] = None, vocab: int = 8, max_len: int = 12,
                 max_count: int = 3, size: int = 512, batch_size: int = 16):
        self.seed, self.vocab, self.max_len, self.max_count, self.batch_size = seed, vocab, max_len, max_count, batch_size
        g = torch.Generator().manual_seed(seed)
        self.splits = {name: self._make(n, g) for name, n in (("train", size), ("val", size // 4), ("test", size // 4))}

    @classmethod
    def check_config(cls, cfg) -> None:
        require(cfg.vocab >= 3 and cfg.max_len > cfg.max_count >= 1,
                "data.vocab must be >= 3 and data.max_len > data.max_count >= 1.")

    def _make(self, n: int, g: torch.Generator) -> dict:
        lengths = torch.randint(self.max_count + 1, self.max_len + 1, (n,), generator=g)  # (n,)
        tokens = torch.randint(2, self.vocab, (n, self.max_len), generator=g)  # (n, T)
        counts = torch.randint(self.max_count + 1, (n,), generator=g)
        where = torch.rand(n, self.max_len, generator=g).masked_fill(
            torch.arange(self.max_len)[None, :] >= lengths[:, None], 2.0).argsort(1)  # valid positions first
        for i in range(n):
            tokens[i, where[i, : counts[i]]] = 1
        tokens[torch.arange(self.max_len)[None, :] >= lengths[:, None]] = 0  # padding
        return {"tokens": tokens, "lengths": lengths, "labels": counts}

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab, num_outputs=self.max_count + 1, head=self.task.head, max_len=self.max_len)

    def state(self) -> dict:
        h = hashlib.sha256(b"".join(s["tokens"].numpy().tobytes() for s in self.splits.values()))
        return {"kind": "count", "fingerprint": h.hexdigest()}

    def examples(self, split: str) -> torch.Tensor:
        return torch.arange(len(self.splits[split]["labels"]))

    def labels(self, split: str) -> torch.Tensor:
        return self.splits[split]["labels"]

    def num_batches(self, split: str, stateful: bool = False) -> int:
        return math.ceil(len(self.splits[split]["labels"]) / self.batch_size)

    def batches(self, split: str, *, stateful: bool = False, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        s = self.splits[split]
        order = torch.arange(len(s["labels"]))
        if split == "train":  # a pure function of (seed, epoch): resuming needs only the position
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + epoch))
        for rows in order.split(self.batch_size)[start:]:
            lengths = s["lengths"][rows]
            yield {"tokens": s["tokens"][rows, : int(lengths.max())], "lengths": lengths, "targets": s["labels"][rows],
                   "carry": False, "num_tokens": int(lengths.sum()), "rows": rows}
