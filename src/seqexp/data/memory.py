"""Generated memory tasks: how far back can a model carry what it read? No files, no download.

Four tasks, each a pure function of the seed, each chosen as `data=<name>`:
- `copy` (Arjovsky et al., 2016; Bai et al., 2018): M symbols, T - 1 blanks, then the delimiter
  and M more: the model writes the M symbols at the last M positions. Length T + 2M (Bai's
  T + 20 for M = 10, with 8 symbols).
- `selective_copy` (Gu & Dao, 2023): M symbols scattered in order among T blanks (noise), then
  M markers where the symbols are written in order. Length T + 2M (Mamba: T = 4096, 16 symbols).
- `recall`, multi-query associative recall (Arora et al., 2023, Zoology): D key-value pairs, then
  blanks with Q of the keys put at random positions; at each the answer is the key's value.
  Length T (Zoology's input_seq_len). Keys are distinct within a sequence and queried in a random
  order; query positions are uniform (Zoology draws them from a power law).
- `adding` (Hochreiter & Schmidhuber, 1997): T values in [0, 1], one marked in each half; the
  target is the sum of the two marked values (regression). Values are tokens here, so every model
  family embeds them: `levels` bins, value (k + 0.5) / levels, and a marked value is its own token.

Layout: the answer always comes after what it depends on, so causal models (the RNNs, causal
attention) can give it; loss and metrics see the answer positions only (tasks/answer.py). Every
example is independent: batches say `carry: False`, so a recurrent model starts each from a zero
state. Rows of a split share one length, so there is no padding.

Splits: train, val and test come from different seeds (numpy's SeedSequence of the run's seed,
the split and the length), as do the fresh training sets of `fresh: true` (one per epoch). Each
length of `eval_lengths` adds the splits `val@<length>` and `test@<length>`, evaluated beside val
and test (the attention model's context covers the longest of them; its learned positions past
the training length are never trained, which is what extrapolation measures).
"""

from __future__ import annotations

import hashlib
import math
import string
import zlib
from typing import Iterator, Optional

import numpy as np
import torch

from seqexp.data.base import Dataset
from seqexp.errors import require
from seqexp.tasks.answer import AnswerPositions
from seqexp.tasks.base import IGNORE
from seqexp.tasks.regress import Regression

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "order": 3}  # "order": the shuffle of a fixed training set
BLANK, MARK = 0, 1  # ids shared by the copy tasks: filler, and "now write the answer"


def rng(seed: int, kind: str, use: str, length: int, epoch: int = 0) -> torch.Generator:
    """A generator for one (task, use, length, epoch): SeedSequence mixes the numbers, so no two
    of them share a stream -- train, val and test never draw the same sequence of examples."""
    entropy = [seed % 2**63, zlib.crc32(kind.encode()), SPLIT_IDS[use], length, epoch]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))


def letters(n: int, upper: bool = False) -> list[str]:
    """Names of n symbols: one letter each while they last, else s0, s1, ..."""
    abc = string.ascii_uppercase if upper else string.ascii_lowercase
    return list(abc[:n]) if n <= 26 else [f"{'K' if upper else 's'}{i}" for i in range(n)]


def distinct_positions(n: int, span: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) distinct positions in [0, span) per row, in increasing order."""
    return torch.rand(n, span, generator=g).argsort(1)[:, :k].sort(1).values


class MemoryData(Dataset):
    """What the tasks share: seeds, splits, batches, state, and the knobs below (each task's
    constructor takes its own and passes these on: `**common`, which the config schema follows,
    schema.py). A task defines `generate`, `total_length` and `names` (one per token id), set
    before calling this constructor."""

    task = AnswerPositions()
    kind = ""  # state()["kind"]
    names: list[str]  # one per token id: the vocabulary (set by the constructor)

    def __init__(self, *, seed: int, saved: Optional[dict] = None, length: int,
                 batch_size: int = 32, size: int = 10_000,  # training examples (an epoch)
                 fresh: bool = False,  # true: a new training set every epoch (never the same example twice)
                 eval_size: int = 1_000,  # examples of val and test, and of each eval length
                 eval_lengths: tuple[int, ...] = ()):  # more lengths to evaluate at: val@T, test@T splits
        self.seed, self.length, self.batch_size = seed, length, batch_size
        self.size, self.fresh, self.eval_size = size, fresh, eval_size
        self.lengths = {"train": length, "val": length, "test": length}
        for L in dict.fromkeys(eval_lengths):
            if L != length:
                self.lengths.update({f"val@{L}": L, f"test@{L}": L})
        # fresh: a new training set each epoch, drawn when the epoch starts (_train_set)
        self.splits = {"train": None if fresh else self.generate(size, length, rng(seed, self.kind, "train", length))}
        for name, L in self.lengths.items():
            if name != "train":  # val@L draws from the val stream of length L, test@L from test's
                self.splits[name] = self.generate(eval_size, L, rng(seed, self.kind, name.split("@")[0], L))
        self._fresh: tuple[int, dict] | None = None
        self.origin = f"{self.kind}, length {length}"

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        """n examples at `length`: {"tokens": (n, total) int64, "targets": (n, total) or (n,)}."""
        raise NotImplementedError

    def total_length(self, length: int) -> int:
        raise NotImplementedError

    @classmethod
    def metric_modes(cls, cfg) -> dict:
        """The task's metrics, and each again at every other length evaluated (val/exact@200: the
        splits val@<length>, whose metrics the task records with the suffix, lab_tasks.py)."""
        modes = super().metric_modes(cfg)
        other = [L for L in dict.fromkeys(cfg.eval_lengths) if L != cfg.length]  # as the constructor makes splits
        return {**modes, **{f"{name}@{L}": mode for L in other for name, mode in modes.items()}}

    @classmethod
    def check_common(cls, cfg) -> None:
        require(cfg.length >= 1, f"data.length must be positive, got {cfg.length}.")
        require(all(L >= 1 for L in cfg.eval_lengths),
                f"data.eval_lengths must be positive, got {list(cfg.eval_lengths)}.")
        require(cfg.batch_size > 0, f"data.batch_size must be positive, got {cfg.batch_size}.")
        require(cfg.size >= cfg.batch_size,
                f"data.size ({cfg.size}) must hold one batch (data.batch_size={cfg.batch_size}).")
        require(cfg.eval_size > 0, f"data.eval_size must be positive, got {cfg.eval_size}.")

    # ---------------------------------------------------------------- what models and checkpoints see
    def model_kwargs(self) -> dict:
        longest = max(self.total_length(L) for L in self.lengths.values())  # attention's context
        return dict(vocab_size=len(self.names), num_outputs=self.num_outputs, head=self.task.head, max_len=longest)

    @property
    def num_outputs(self) -> int:
        return len(self.names)  # a logit per token id at every position

    def state(self) -> dict:
        h = hashlib.sha256()
        for name in ("train", "val", "test"):
            if self.splits[name] is not None:  # a fresh training set is a function of the seed
                h.update(self.splits[name]["tokens"].numpy().tobytes())
        return {"kind": self.kind, "itos": list(self.names), "fingerprint": h.hexdigest()}

    def decode(self, ids) -> str:
        names = [self.names[i] for i in ids]
        return ("" if all(len(n) == 1 for n in self.names) else " ").join(names)

    # ---------------------------------------------------------------- batches
    def _train_set(self, epoch: int) -> dict:
        if not self.fresh:
            return self.splits["train"]
        if self._fresh is None or self._fresh[0] != epoch:
            g = rng(self.seed, self.kind, "train", self.length, epoch)
            self._fresh = (epoch, self.generate(self.size, self.length, g))
        return self._fresh[1]

    def num_batches(self, split: str, stateful: bool = False) -> int:
        if split == "train":
            return self.size // self.batch_size  # full batches only
        return math.ceil(len(self.splits[split]["tokens"]) / self.batch_size)

    def batches(self, split: str, *, stateful: bool = False, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """Rows in a pure function of (seed, epoch) from batch `start` on; every row is its own
        sequence (`carry: False`), whatever the model."""
        data = self._train_set(epoch) if split == "train" else self.splits[split]
        n, B = len(data["tokens"]), self.batch_size
        order = torch.arange(n)
        if split == "train":
            if not self.fresh:  # a fresh set is already in random order
                order = torch.randperm(n, generator=rng(self.seed, self.kind, "order", self.length, epoch))
            order = order[: n // B * B]
        T = data["tokens"].shape[1]
        for rows in order.split(B)[start:]:
            yield {"tokens": data["tokens"][rows], "targets": data["targets"][rows],
                   "lengths": torch.full((len(rows),), T), "carry": False, "num_tokens": len(rows) * T}


class CopyData(MemoryData):
    kind = "copy"

    def __init__(self, *,
                 length: int = 100,  # T: the gap between the symbols and the delimiter (Bai et al.: 1000)
                 num_symbols: int = 10,  # M: symbols to copy
                 alphabet: int = 8,  # distinct symbols
                 **common):
        self.num_symbols, self.alphabet = num_symbols, alphabet
        self.names = ["_", ":"] + letters(alphabet)
        super().__init__(length=length, **common)

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_common(cfg)
        require(cfg.num_symbols >= 1 and cfg.alphabet >= 2, "data.num_symbols must be >= 1 and data.alphabet >= 2.")

    def total_length(self, length: int) -> int:
        return length + 2 * self.num_symbols

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        M = self.num_symbols
        symbols = torch.randint(2, 2 + self.alphabet, (n, M), generator=g)
        tokens = torch.full((n, length + 2 * M), BLANK)
        tokens[:, :M] = symbols
        tokens[:, M + length - 1:] = MARK  # the delimiter, then M more: where the answer goes
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -M:] = symbols
        return {"tokens": tokens, "targets": targets}


class SelectiveCopyData(CopyData):
    """Copy's vocabulary, checks and length; the symbols scattered among the blanks instead."""
    kind = "selective_copy"

    def __init__(self, *,
                 length: int = 100,  # T: blanks (noise) among which the symbols are scattered (Mamba: 4096)
                 num_symbols: int = 8,  # M: symbols to copy, in order (Mamba: 16)
                 alphabet: int = 8,  # distinct symbols (Mamba: 16)
                 **common):
        # its own signature: the defaults (the config schema) differ from copy's
        super().__init__(length=length, num_symbols=num_symbols, alphabet=alphabet, **common)

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        M = self.num_symbols
        region = length + M  # the symbols and the noise
        symbols = torch.randint(2, 2 + self.alphabet, (n, M), generator=g)
        where = distinct_positions(n, region, M, g)  # (n, M), increasing: the symbols keep their order
        tokens = torch.full((n, region + M), BLANK)
        tokens.scatter_(1, where, symbols)
        tokens[:, region:] = MARK
        targets = torch.full_like(tokens, IGNORE)
        targets[:, region:] = symbols
        return {"tokens": tokens, "targets": targets}


class RecallData(MemoryData):
    kind = "recall"

    def __init__(self, *,
                 length: int = 64,  # T: the whole sequence, pairs and queries (Zoology: 64..512)
                 num_pairs: int = 8,  # D: key-value pairs (Zoology: 4..64)
                 num_queries: int = 0,  # Q: keys asked for; 0: every key once (as Zoology)
                 alphabet: int = 32,  # distinct keys, and distinct values (Zoology: 8192 ids, half each)
                 **common):
        self.num_pairs, self.alphabet = num_pairs, alphabet
        self.num_queries = num_queries or num_pairs
        # 0 blank, then the keys (upper case), then the values (lower case)
        self.names = ["_"] + letters(alphabet, upper=True) + letters(alphabet)
        if alphabet > 26:
            self.names = ["_"] + [f"k{i}" for i in range(alphabet)] + [f"v{i}" for i in range(alphabet)]
        super().__init__(length=length, **common)

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_common(cfg)
        D, Q = cfg.num_pairs, cfg.num_queries or cfg.num_pairs
        require(1 <= D <= cfg.alphabet, f"data.num_pairs must be in 1..data.alphabet ({cfg.alphabet}): keys are "
                f"distinct; got {D}.")
        require(0 <= cfg.num_queries <= D,
                f"data.num_queries must be in 0..data.num_pairs ({D}), got {cfg.num_queries}.")
        for L in [cfg.length, *cfg.eval_lengths]:
            require(L >= 2 * D + Q, f"data.length and data.eval_lengths must hold the {D} pairs and {Q} queries "
                    f"(>= {2 * D + Q}); got {L}.")

    def total_length(self, length: int) -> int:
        return length

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        D, Q, K = self.num_pairs, self.num_queries, self.alphabet
        keys = torch.rand(n, K, generator=g).argsort(1)[:, :D] + 1  # (n, D) distinct key ids 1..K
        values = torch.randint(K + 1, 2 * K + 1, (n, D), generator=g)  # ids K+1..2K
        tokens = torch.full((n, length), BLANK)
        tokens[:, 0 : 2 * D : 2], tokens[:, 1 : 2 * D : 2] = keys, values
        asked = torch.rand(n, D, generator=g).argsort(1)[:, :Q]  # which pairs, in a random order
        where = 2 * D + distinct_positions(n, length - 2 * D, Q, g)  # (n, Q) after the pairs
        tokens.scatter_(1, where, keys.gather(1, asked))
        targets = torch.full_like(tokens, IGNORE)
        targets.scatter_(1, where, values.gather(1, asked))
        return {"tokens": tokens, "targets": targets}


class AddingData(MemoryData):
    task = Regression()
    kind = "adding"

    def __init__(self, *,
                 length: int = 50,  # T: values per sequence (Bai et al.: 600; Hochreiter & Schmidhuber: 100+)
                 levels: int = 10,  # value bins: value k is (k + 0.5) / levels, a U(0, 1) at that resolution
                 **common):
        self.levels = levels
        # id k: value k, unmarked; id levels + k: value k, marked (an embedding sees both at once)
        values = [f"{(k + 0.5) / levels:.3g}" for k in range(levels)]
        self.names = values + [v + "*" for v in values]
        super().__init__(length=length, **common)

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_common(cfg)
        require(min([cfg.length, *cfg.eval_lengths]) >= 2, "data.length and data.eval_lengths must be >= 2 (one "
                "marked value in each half).")
        require(cfg.levels >= 2, f"data.levels must be >= 2, got {cfg.levels}.")

    @property
    def num_outputs(self) -> int:
        return 1  # the predicted sum

    def total_length(self, length: int) -> int:
        return length

    def value(self, tokens: torch.Tensor) -> torch.Tensor:
        return ((tokens % self.levels).float() + 0.5) / self.levels

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        half = length // 2
        tokens = torch.randint(0, self.levels, (n, length), generator=g)
        first = torch.randint(0, half, (n, 1), generator=g)  # one marked value in each half
        second = torch.randint(half, length, (n, 1), generator=g)
        marked = torch.cat([first, second], 1)  # (n, 2)
        tokens.scatter_(1, marked, tokens.gather(1, marked) + self.levels)
        return {"tokens": tokens, "targets": self.value(tokens.gather(1, marked)).sum(1)}
