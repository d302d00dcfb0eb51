"""A throwaway dataset: does token 1 occur in the sequence? Generated from the seed, no files.

Sequences of 3..max_len ids drawn from 2..vocab-1, half of them with a 1 put somewhere: a
classifier must find one token anywhere in a padded sequence. Ids are written as text with
spaces between them, so a trained run also classifies text ("2 5 1 3").
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch

from seqexp.data.base import Dataset
from seqexp.errors import require
from seqexp.tasks.classify import Classification


class Encoder:
    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([int(t) for t in text.split()] or [0])

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


class PresenceData(Dataset):
    task = Classification()
    classes = ("absent", "present")

    def __init__(self, *, seed: int, saved: Optional[dict] = None, vocab: int = 8, max_len: int = 12,
                 size: int = 256, batch_size: int = 16):
        self.seed, self.vocab, self.max_len, self.batch_size = seed, vocab, max_len, batch_size
        g = torch.Generator().manual_seed(seed)
        self.splits = {name: self._make(n, g) for name, n in (("train", size), ("val", size // 4), ("test", size // 4))}

    @classmethod
    def check_config(cls, cfg) -> None:
        require(cfg.vocab >= 3 and cfg.max_len >= 3, "data.vocab and data.max_len must be at least 3.")

    def _make(self, n: int, g: torch.Generator) -> dict:
        lengths = torch.randint(3, self.max_len + 1, (n,), generator=g)
        tokens = torch.randint(2, self.vocab, (n, self.max_len), generator=g)
        labels = torch.randint(2, (n,), generator=g)
        where = (torch.rand(n, generator=g) * lengths).long()
        tokens[labels == 1, where[labels == 1]] = 1
        tokens[torch.arange(self.max_len)[None, :] >= lengths[:, None]] = 0  # padding
        return {"tokens": tokens, "lengths": lengths, "labels": labels}

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab, num_outputs=2, head=self.task.head, max_len=self.max_len)

    def state(self) -> dict:
        h = hashlib.sha256(b"".join(s["tokens"].numpy().tobytes() for s in self.splits.values()))
        return {"kind": "presence", "classes": list(self.classes), "fingerprint": h.hexdigest()}

    @classmethod
    def text_encoder(cls, saved: dict) -> Encoder:
        return Encoder()

    def decode(self, ids) -> str:
        return Encoder().decode(ids)

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
