"""Character corpus for next-character language modelling.

Split: the first (1 - val_fraction) of the text trains, the rest validates (contiguous, as
char-rnn and nanoGPT do). The vocabulary is the set of training characters plus id 0 for
characters never seen in training.

Two ways to batch the training text, chosen by the model:
- stateful (recurrent models, truncated BPTT as in char-rnn): the text is cut into B
  contiguous streams; batch i is chunk i of every stream, so the hidden state left by batch i
  is the right start for batch i + 1. Order is fixed; the state is reset at each epoch.
- windows (attention): independent windows of seq_len characters at a random offset per
  epoch, in random order. Order is a pure function of (seed, epoch), so resuming needs only
  the position.
Evaluation covers every character of the split exactly once, in the same two layouts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sysconfig
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from seqexp.data.base import Dataset
from seqexp.data.download import cache_dir as default_cache_dir, cache_name, download
from seqexp.errors import UserError, require
from seqexp.tasks.base import IGNORE  # the target id losses and metrics skip
from seqexp.tasks.lm import LanguageModeling

log = logging.getLogger("seqexp")

UNK = "\ufffd"  # id 0: characters not in the training text


def stdlib_text(max_chars: int) -> str:
    """The Python standard library's top-level modules, sorted by name, up to max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def read_text_file(path: Path) -> str:
    if path.is_dir():
        raise UserError(f"data.path: {path} is a directory. Point data.path at a UTF-8 text file.")
    if path.exists() and not path.is_file():
        raise UserError(f"data.path: {path} is not a regular file (a device, FIFO or socket). "
                        f"Point data.path at a UTF-8 text file.")
    if not path.is_file():
        raise UserError(f"data.path: no such file: {path}. Point data.path at a UTF-8 text file.")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"data.path: cannot read {path} ({e.strerror or e}). Point data.path at a readable file.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data.path: {path} is not UTF-8 text (invalid byte at offset {e.start}). "
                        f"Convert it, e.g. `iconv -f latin1 -t utf-8`.") from None
    if not text:
        raise UserError(f"data.path: {path} is empty. Point data.path at a file with text in it.")
    if not text.strip():
        raise UserError(f"data.path: {path} has no text: its {len(text)} characters are all whitespace "
                        f"(newlines, spaces). Point data.path at a file with text in it.")
    return text


def load_text(path: Optional[str], source: str, sha256: Optional[str], max_chars: int,
              cache: Optional[str]) -> tuple[str, str]:
    """-> (text, where it came from)."""
    if path is not None:
        p = Path(path).expanduser()
        return read_text_file(p), str(p)
    if source == "stdlib":
        return stdlib_text(max_chars), f"python {sysconfig.get_python_version()} stdlib"
    if source.startswith(("http://", "https://")):
        dest = default_cache_dir(cache) / "char" / cache_name(source, "corpus.txt")
        return read_text_file(download(source, dest, sha256)), source
    raise UserError(f"data.source must be 'stdlib' or an http(s) URL, got '{source}'.")


class CharVocab:
    """Characters <-> ids; id 0 stands for every character not in the vocabulary.

    Built from a checkpoint's saved `itos` alone (`CharData.text_encoder`), so a trained run
    encodes new text (prompts, reviews) without reading its corpus.
    """

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self._codes = np.array([ord(c) for c in self.itos[1:]], dtype=np.int64)  # sorted code points

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls([UNK] + sorted(set(text) - {UNK}))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        """str -> (N,) int64 ids; unseen characters -> 0. Vectorised: 2M chars in ~0.1 s."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codes, cps).clip(max=len(self._codes) - 1)
        ids = np.where(self._codes[pos] == cps, pos + 1, 0)
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` that encode to id 0, in order of appearance."""
        known = set(self.itos[1:])
        return list(dict.fromkeys(c for c in text if c not in known))


class CharData(Dataset):
    task = LanguageModeling()

    def __init__(self, *, seed: int, path: Optional[str] = None, source: str = "stdlib",
                 sha256: Optional[str] = None, max_chars: int = 2_000_000, val_fraction: float = 0.1,
                 batch_size: int = 32, seq_len: int = 128, cache_dir: Optional[str] = None,
                 saved: Optional[dict] = None):
        t0 = time.perf_counter()
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len
        text, self.origin = load_text(path, source, sha256, max_chars, cache_dir)
        split = int(len(text) * (1.0 - val_fraction))
        train_text, val_text = text[:split], text[split:]
        # a checkpoint brings its own vocabulary, so ids keep their meaning on other text
        self.vocab = CharVocab(saved["itos"]) if saved is not None else CharVocab.from_text(train_text)
        self.itos = self.vocab.itos
        self.splits = {"train": self.encode(train_text), "val": self.encode(val_text)}
        self._check_size(stateful=True)  # the smaller need; the model's layout is checked in num_batches
        if len(self.splits["val"]) < 2:
            raise UserError(f"the validation split of {self.origin} is empty; raise data.val_fraction.")
        unknown = {split: int((ids == 0).sum()) for split, ids in self.splits.items()}
        log.info("char: %s train / %s val characters, vocabulary %d (%s); unknown characters (id 0): %s; "
                 "ready in %.2f s", f"{len(train_text):,}", f"{len(val_text):,}", self.vocab_size,
                 "the checkpoint's" if saved is not None else "the training text's",
                 ", ".join(f"{n:,} in {split}" for split, n in unknown.items()), time.perf_counter() - t0)

    @classmethod
    def check_config(cls, cfg) -> None:
        require(cfg.batch_size > 0, f"data.batch_size must be positive, got {cfg.batch_size}.")
        require(cfg.seq_len > 1, f"data.seq_len must be > 1, got {cfg.seq_len}.")
        require(0.0 < cfg.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}.")

    # ---------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, num_outputs=self.vocab_size, head=self.task.head,
                    max_len=self.seq_len)

    def state(self) -> dict:
        """What a checkpoint needs to map text to ids and back, and to recognise its data on resume."""
        h = hashlib.sha256()
        for split in ("train", "val"):
            h.update(self.splits[split].numpy().tobytes())
        return {"kind": "char", "itos": self.itos, "fingerprint": h.hexdigest()}

    @classmethod
    def text_encoder(cls, saved: dict) -> CharVocab:
        return CharVocab(saved["itos"])

    # ---------------------------------------------------------------- batches
    def num_batches(self, split: str, stateful: bool) -> int:
        n, B, T = len(self.splits[split]) - 1, self.batch_size, self.seq_len  # n targets
        if split != "train":
            rows, per_row = self._eval_layout(n, stateful)
            return math.ceil(per_row / T) if stateful else math.ceil(rows / B)
        self._check_size(stateful)
        return (n // B) // T if stateful else self._num_windows() // B

    def _check_size(self, stateful: bool) -> None:
        """One training batch must fit: B streams of T + 1 characters, or B windows of T + 1 at
        any offset in [0, T) (one window's worth more)."""
        B, T, have = self.batch_size, self.seq_len, len(self.splits["train"])
        need = B * T + 1 if stateful else (B + 1) * T + 1
        if have < need:
            layout = f"{B} streams (recurrent models)" if stateful else f"{B} windows at a random offset (attention models)"
            raise UserError(f"the training text ({self.origin}) has {have} characters; data.batch_size x "
                            f"data.seq_len = {B} x {T} needs at least {need} for {layout}. Lower them or use more text.")

    def _num_windows(self) -> int:
        # one fewer than fits, so that every random offset in [0, T) leaves room for all of them
        return (len(self.splits["train"]) - 1) // self.seq_len - 1

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """Yield batch dicts from batch index `start` on; see the module docstring for layouts."""
        if split == "train":
            yield from (self._train_stream if stateful else self._train_windows)(epoch, start)
        else:
            yield from self._eval_rows(self.splits[split], stateful)

    def _train_stream(self, epoch: int, start: int) -> Iterator[dict]:
        data, B, T = self.splits["train"], self.batch_size, self.seq_len
        L = (len(data) - 1) // B  # characters per stream
        x = data[: B * L].view(B, L)  # (B, L)
        y = data[1 : B * L + 1].view(B, L)
        for i in range(start, L // T):
            s = slice(i * T, (i + 1) * T)
            yield {"tokens": x[:, s], "targets": y[:, s], "carry": i > 0, "num_tokens": B * T}

    def _train_windows(self, epoch: int, start: int) -> Iterator[dict]:
        data, B, T = self.splits["train"], self.batch_size, self.seq_len
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(T, (1,), generator=g))
        order = torch.randperm(self._num_windows(), generator=g)
        span = torch.arange(T + 1)
        for i in range(start, len(order) // B):
            starts = offset + order[i * B : (i + 1) * B] * T  # (B,)
            w = data[starts[:, None] + span]  # (B, T + 1)
            yield {"tokens": w[:, :-1], "targets": w[:, 1:], "carry": False, "num_tokens": B * T}

    def _eval_layout(self, n: int, stateful: bool) -> tuple[int, int]:
        """(rows, row length) that hold n targets: B streams, or windows of exactly T."""
        if stateful:
            rows = min(self.batch_size, n)
            return rows, math.ceil(n / rows)
        return math.ceil(n / self.seq_len), self.seq_len

    def _eval_rows(self, data: torch.Tensor, stateful: bool) -> Iterator[dict]:
        """Every target exactly once; the tail is padded with IGNORE targets."""
        B, T = self.batch_size, self.seq_len
        n = len(data) - 1
        rows, per_row = self._eval_layout(n, stateful)
        pad = rows * per_row - n  # < rows (streams) or < T (windows): only the last row is padded
        x = torch.cat([data[:-1], data.new_zeros(pad)]).view(rows, per_row)
        y = torch.cat([data[1:], data.new_full((pad,), IGNORE)]).view(rows, per_row)
        if stateful:
            for i in range(math.ceil(per_row / T)):  # the last chunk may be shorter than T
                s = slice(i * T, (i + 1) * T)
                yield {"tokens": x[:, s], "targets": y[:, s], "carry": i > 0,
                       "num_tokens": int((y[:, s] != IGNORE).sum())}
        else:
            for i in range(0, rows, B):
                yield {"tokens": x[i : i + B], "targets": y[i : i + B], "carry": False,
                       "num_tokens": int((y[i : i + B] != IGNORE).sum())}
