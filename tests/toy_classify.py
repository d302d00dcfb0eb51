"""A tiny character-level classification dataset, so that classifier code paths (predict,
evaluate's confusion counts, the confidently-wrong texts) run on a real training run."""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional

import torch

from seqexp.data.base import Dataset
from seqexp.data.char import CharVocab
from seqexp.tasks.classify import Classification

POSITIVE = "good great fine nice".split()
NEGATIVE = "bad awful poor dull".split()
FILLER = "the film was and a plot it is".split()


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


class ToySentiment(Dataset):
    task = Classification()
    classes = ["neg", "pos"]

    def __init__(self, *, seed: int, size: int = 160, batch_size: int = 8, max_len: int = 40,
                 saved: Optional[dict] = None):
        rng = random.Random(0)  # the texts are fixed; `seed` would only order batches
        labels = [i % 2 for i in range(size)]
        texts = [sentence(rng, y) for y in labels]
        n_val = size // 4
        self.batch_size, self.max_len = batch_size, max_len
        self.vocab = CharVocab(saved["itos"]) if saved is not None else CharVocab.from_text("".join(texts[n_val:]))
        self.splits = {"train": (texts[n_val:], labels[n_val:]), "val": (texts[:n_val], labels[:n_val])}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, num_outputs=2, head=self.task.head, max_len=self.max_len)

    def state(self) -> dict:
        return {"kind": "char", "itos": self.vocab.itos, "classes": self.classes}

    @classmethod
    def text_encoder(cls, saved: dict) -> CharVocab:
        return CharVocab(saved["itos"])

    def num_batches(self, split: str, stateful: bool) -> int:
        return math.ceil(len(self.splits[split][0]) / self.batch_size)

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        texts, labels = self.splits[split]
        for i in range(start * self.batch_size, len(texts), self.batch_size):
            ids = [self.vocab.encode(t)[: self.max_len] for t in texts[i : i + self.batch_size]]
            yield {"tokens": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True),
                   "lengths": torch.tensor([len(x) for x in ids]),
                   "targets": torch.tensor(labels[i : i + self.batch_size]),
                   "carry": False, "num_tokens": sum(len(x) for x in ids)}
