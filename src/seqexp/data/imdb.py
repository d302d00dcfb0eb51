"""IMDB sentiment (Maas et al., 2011): reviews -> cached token ids -> vocabulary -> padded batches.

1. Corpus (cached). Every review is tokenized (text.py) into ids of a corpus dictionary that holds
   every distinct token. The ids are saved as tensors under `<cache>/imdb/`, keyed by the archive's
   SHA-256 (or, for a directory, a fingerprint of its files) and the tokenizer settings, so a
   second run reads one file instead of tokenizing 50,000 reviews.
2. Split. A stratified validation set is drawn from the 25,000 training reviews with the run's
   seed; the 25,000 test reviews are only evaluated at the end, on the best checkpoint. The test
   reviews are of other movies than the training ones. By default (`val_split=contiguous`)
   validation takes runs of consecutive review ids: aclImdb numbers a movie's reviews of one class
   consecutively, so a validation review's movie has no other review of that class in training
   (its reviews of the other class may train: the two classes are numbered apart). A random
   choice (`val_split=random`) trains on other reviews of the same movies with mostly the same
   label, and validation rewards memorising names and plots: it read 2.5 points above test for
   an attention encoder, 0.9 for an LSTM (BENCHMARKS.md).
3. Vocabulary, from the training reviews only (validation held out): the `max_vocab` most
   frequent tokens seen at least `min_freq` times, plus pad (0) and unknown (1). It is chosen at
   load time in milliseconds, so vocabulary settings never invalidate the cache; a checkpoint
   stores it (`state()`), and `saved=` reuses it.
4. Truncation to `max_len` tokens: head, tail, or head+tail -- the first quarter and the last
   three quarters, the split Sun et al. (2019) found best for long IMDB reviews.
5. Batches. Training: shuffle, cut into chunks of `bucket_chunks` batches, sort each chunk by
   length, cut into batches, shuffle the batches -- a pure function of (seed, epoch), every
   review once per epoch, little padding. Evaluation: all reviews sorted by length.
Invalid UTF-8: the bytes are replaced by U+FFFD, which the tokenizer drops; the reviews are named
in a warning. Reviews with no token at all are left out, with a warning. The cache keeps both, so
every run warns, not only the one that tokenized. Concurrent runs on one cache tokenize once (a
file lock, locks.py); the others wait and read the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import torch

from seqexp.data import aclimdb
from seqexp.data.base import Dataset
from seqexp.data.download import cache_dir as default_cache_dir, cache_name, download, sha256sum
from seqexp.data.text import PAD_ID, TOKEN, UNK_ID, build_vocab, decode, tokenize
from seqexp.errors import UserError, require
from seqexp.files import save_tensors
from seqexp.locks import file_lock
from seqexp.tasks.classify import Classification

log = logging.getLogger("seqexp")

CACHE_FORMAT = "seqexp-imdb-tokens/2"  # 2: review numbers. A new value re-tokenizes once.
# Checkpoints name their data by a hash of its content and the tokenizer settings, salted with
# this constant -- the cache format when fingerprints were first saved -- rather than with
# CACHE_FORMAT, so that a new cache layout never makes a saved run "other data" at resume or in
# an ensemble. Never change it.
FINGERPRINT_SALT = "seqexp-imdb-tokens/2"
HEAD = {"head": None, "tail": 0, "head+tail": 0.25}  # share of max_len taken from the start


@dataclass
class Split:
    """Some reviews of the corpus: review i is ids[offsets[i] : offsets[i] + lengths[i]], of
    which `kept[i]` tokens are used. Truncation and vocabulary are applied per batch (collate)."""
    offsets: torch.Tensor  # (R,) into the corpus ids
    lengths: torch.Tensor  # (R,) full review lengths, all >= 1
    kept: torch.Tensor  # (R,) min(length, max_len)
    labels: torch.Tensor  # (R,) 0 neg, 1 pos

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- corpus cache
def build_corpus(reviews: list[aclimdb.Review], lowercase: bool) -> dict:
    """Tokenize every review into ids of a dictionary of all its tokens (first appearance order)."""
    stoi = defaultdict()
    stoi.default_factory = stoi.__len__  # an unseen token gets the next id
    kept, tokens, invalid = [], [], []
    for r in reviews:
        text, ok = decode(r.raw)
        if not ok:
            invalid.append(f"{r.split}/{aclimdb.LABELS[r.label]}/{r.name}")
        toks = tokenize(text, lowercase)
        if toks:
            kept.append(r)
            tokens.append(toks)
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    ids = np.fromiter(map(stoi.__getitem__, itertools.chain.from_iterable(tokens)), dtype=np.int32,
                      count=int(lengths.sum()))
    return {
        "format": CACHE_FORMAT,
        "words": "\n".join(stoi),  # tokens never contain whitespace
        "ids": torch.from_numpy(ids),
        "lengths": torch.from_numpy(lengths),
        "labels": torch.tensor([r.label for r in kept]),
        "numbers": torch.tensor([review_number(r.name) for r in kept], dtype=torch.long),
        "is_test": torch.tensor([r.split == "test" for r in kept]),
        "invalid_utf8": invalid,
        "empty": len(reviews) - len(kept),
    }


def find_source(path: Optional[str], url: str, sha256: Optional[str],
                root: Path) -> tuple[str, str, Callable[[], list[aclimdb.Review]]]:
    """-> (what identifies the data, where it is, how to read its reviews). Reads nothing yet."""
    if path is None:
        archive = root / cache_name(url, "aclImdb.tar.gz")
        if sha256 is None:  # an unpinned URL: download first to learn what it is
            sha256 = sha256sum(download(url, archive, None))
        # the download is verified before it is opened, and only when no cache matches
        return f"sha256:{sha256}", url, lambda: aclimdb.read_archive(download(url, archive, sha256))
    p = Path(path).expanduser()
    if p.is_dir():
        found = aclimdb.find_root(p)
        if found is None:
            raise UserError(f"data.path: {p} is a directory without aclImdb/train and aclImdb/test in it.")
        return f"dir:{aclimdb.fingerprint(found)}", str(found), lambda: aclimdb.read_reviews(found)
    if p.is_file():
        return f"sha256:{sha256sum(p)}", str(p), lambda: aclimdb.read_archive(p)
    if p.exists():
        raise UserError(f"data.path: {p} is not a regular file (a device, FIFO or socket). Point it at "
                        f"aclImdb_v1.tar.gz or an extracted aclImdb directory, or leave it null to download.")
    raise UserError(f"data.path: no such file or directory: {p}. Point it at aclImdb_v1.tar.gz or an "
                    f"extracted aclImdb directory, or leave it null to download.")


def load_corpus(path: Optional[str], url: str, sha256: Optional[str], cache: Optional[str],
                lowercase: bool) -> tuple[dict, str, str]:
    """-> (corpus, where it came from, fingerprint). Tokenizes only when no cached corpus matches.

    Both the cache file's name and the fingerprint hash the archive's (or directory's) content
    and the tokenizer settings; the file name also hashes CACHE_FORMAT, the fingerprint (which
    checkpoints keep, and resume and ensembles compare) FINGERPRINT_SALT instead."""
    root = default_cache_dir(cache) / "imdb"
    source, origin, read_reviews = find_source(path, url, sha256, root)
    settings = {"source": source, "lowercase": lowercase, "token": TOKEN.pattern}

    def key(salt: str) -> str:
        return hashlib.sha256(json.dumps({"format": salt, **settings}, sort_keys=True).encode()).hexdigest()[:16]

    fingerprint = key(FINGERPRINT_SALT)
    cached = root / f"tokens-{key(CACHE_FORMAT)}.pt"
    corpus = read_cache(cached)
    if corpus is None:
        # one tokenization per cache: concurrent runs (joblib workers, torchrun, two terminals)
        # wait here for the first, then read what it wrote (written atomically: never half a file)
        with file_lock(cached.with_name(f".{cached.name}.lock")):
            corpus = read_cache(cached)
            if corpus is None:
                t0 = time.perf_counter()
                corpus = build_corpus(read_reviews(), lowercase)
                save_tensors(cached, corpus)  # atomic: a killed run never leaves half a cache
                log.info("imdb: tokenized %d reviews from %s in %.1f s; cached in %s", len(corpus["labels"]),
                         origin, time.perf_counter() - t0, cached)
    # every run, not only the one that built the cache: the cache keeps what was dropped
    if corpus["invalid_utf8"]:
        bad = corpus["invalid_utf8"]
        log.warning("%d review(s) are not valid UTF-8 (first: %s); invalid bytes were replaced by U+FFFD "
                    "and dropped by the tokenizer", len(bad), bad[0])
    if corpus["empty"]:
        log.warning("%d review(s) have no token and were left out", corpus["empty"])
    return corpus, origin, fingerprint


def read_cache(cached: Path) -> Optional[dict]:
    """The cached corpus, or None when there is none or it is unreadable (then it is rebuilt)."""
    if not cached.is_file():
        return None
    try:
        return torch.load(cached, weights_only=True)
    except Exception as e:  # a corrupt cache file is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s)", cached, e)
        return None


# ----------------------------------------------------------------------------- splits
def gather(ids: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The tokens of the given reviews, back to back."""
    shift = torch.repeat_interleave(offsets - (torch.cumsum(lengths, 0) - lengths), lengths)
    return ids[shift + torch.arange(len(shift))]


VAL_BLOCK = 100  # reviews per contiguous validation block: a movie has at most 30 per label


def review_number(name: str) -> int:
    """The id of `<id>_<rating>.txt`; -1 for another name (such reviews keep their file-name order)."""
    m = re.match(r"(\d+)_", name)
    return int(m.group(1)) if m else -1


def validation_split(labels: torch.Tensor, numbers: torch.Tensor, fraction: float, seed: int,
                     contiguous: bool) -> torch.Tensor:
    """(R,) bool, True for the validation reviews: `fraction` of each class, chosen by seed.

    contiguous: each class's reviews in id order, rotated by a random offset, cut into blocks of
    VAL_BLOCK consecutive ids; whole blocks in random order until the fraction is reached. Only a
    movie on a block's edge can have reviews on both sides. random: any reviews."""
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        k = round(len(idx) * fraction)
        if contiguous:
            idx = idx[torch.argsort(numbers[idx], stable=True)]
            idx = idx.roll(int(torch.randint(len(idx), (), generator=g)))
            blocks = idx.split(VAL_BLOCK)
            idx = torch.cat([blocks[i] for i in torch.randperm(len(blocks), generator=g).tolist()])
            val[idx[:k]] = True
        else:
            val[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return val


# ----------------------------------------------------------------------------- dataset
class ImdbData(Dataset):
    task = Classification()
    classes = aclimdb.LABELS

    def __init__(self, *, seed: int, path: Optional[str] = None, url: str = aclimdb.URL,
                 sha256: Optional[str] = aclimdb.SHA256, cache_dir: Optional[str] = None,
                 lowercase: bool = True, max_vocab: int = 25_000, min_freq: int = 2, max_len: int = 400,
                 truncation: Literal["head", "tail", "head+tail"] = "head+tail", val_fraction: float = 0.1,
                 val_split: Literal["contiguous", "random"] = "contiguous",
                 batch_size: int = 64,  # every IMDB recipe was measured with it: 352 steps per epoch
                 bucket_chunks: int = 100, saved: Optional[dict] = None):
        t0 = time.perf_counter()
        self.seed, self.batch_size, self.bucket_chunks = seed, batch_size, bucket_chunks
        self.lowercase, self.max_len, self.truncation = lowercase, max_len, str(truncation)
        corpus, self.origin, self.fingerprint = load_corpus(path, url, sha256, cache_dir, lowercase)
        words = corpus["words"].split("\n")
        self.ids, lengths, labels = corpus["ids"], corpus["lengths"], corpus["labels"]  # ids: (N,) int32
        offsets = torch.cumsum(lengths, 0) - lengths
        is_test = corpus["is_test"]
        train_rows = torch.nonzero(~is_test).flatten()
        is_val = torch.zeros_like(is_test)
        is_val[train_rows[validation_split(labels[train_rows], corpus["numbers"][train_rows], val_fraction, seed,
                                           contiguous=str(val_split) == "contiguous")]] = True
        is_train = ~is_test & ~is_val

        if saved is not None:  # a checkpoint's vocabulary: ids keep their meaning
            self.itos = list(saved["itos"])
        else:  # from the training reviews only
            self.itos = build_vocab(words, self._train_counts(is_train, offsets, lengths, len(words)), max_vocab,
                                    min_freq)
        stoi = {w: i for i, w in enumerate(self.itos)}
        self.to_vocab = torch.tensor([stoi.get(w, UNK_ID) for w in words])  # corpus id -> vocab id
        share = HEAD[self.truncation]
        self.head = max_len if share is None else int(max_len * share)  # tokens kept from the start

        self.splits: dict[str, Split] = {}
        for name, rows in (("train", is_train), ("val", is_val), ("test", is_test)):
            rows = torch.nonzero(rows).flatten()
            self.splits[name] = Split(offsets[rows], lengths[rows], lengths[rows].clamp(max=max_len), labels[rows])
        if len(self.splits["train"]) == 0 or len(self.splits["val"]) == 0:
            raise UserError(f"{self.origin}: data.val_fraction={val_fraction} leaves no training or no "
                            f"validation review; use a value in (0, 1) and a dataset with more reviews.")
        log.info("imdb: %s train / %s val / %s test reviews, vocabulary %d, max_len %d (%s); ready in %.2f s",
                 *(f"{len(s):,}" for s in self.splits.values()), self.vocab_size, max_len, self.truncation,
                 time.perf_counter() - t0)

    @classmethod
    def check_config(cls, cfg) -> None:
        for key in ("max_len", "max_vocab", "min_freq", "bucket_chunks", "batch_size"):
            require(cfg[key] > 0, f"data.{key} must be positive, got {cfg[key]}.")
        require(0.0 < cfg.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}.")

    def _train_counts(self, is_train, offsets, lengths, num_words) -> np.ndarray:
        """(num_words,) occurrences in the training reviews. Reviews are in split order: the
        training reviews span one block of the corpus, less the validation reviews among them."""
        rows = torch.nonzero(is_train).flatten()
        first, last = int(rows[0]), int(rows[-1])
        block = self.ids[offsets[first] : offsets[last] + lengths[last]]
        held = torch.nonzero(~is_train[first : last + 1]).flatten() + first
        counts = torch.bincount(block, minlength=num_words)
        return (counts - torch.bincount(gather(self.ids, offsets[held], lengths[held]), minlength=num_words)).numpy()

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def model_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, num_outputs=len(self.classes), head=self.task.head,
                    max_len=self.max_len)

    def state(self) -> dict:
        """What a checkpoint needs to turn new text into the same ids."""
        return {"kind": "imdb", "itos": self.itos, "lowercase": self.lowercase, "max_len": self.max_len,
                "truncation": self.truncation, "classes": list(self.classes), "fingerprint": self.fingerprint}

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in ids)

    def examples(self, split: str) -> torch.Tensor:
        return self.splits[split].offsets  # where each review starts in the corpus: the same in every run

    def labels(self, split: str) -> torch.Tensor:
        return self.splits[split].labels

    @classmethod
    def text_encoder(cls, saved: dict) -> "ReviewEncoder":
        return ReviewEncoder(saved)

    @classmethod
    def upgrade_config(cls, cfg: dict) -> dict:
        # saved before data.val_split existed: those runs drew their validation reviews at random
        return {"val_split": "random", **cfg}

    # ---------------------------------------------------------------- batches
    def num_batches(self, split: str, stateful: bool = False) -> int:
        return math.ceil(len(self.splits[split]) / self.batch_size)

    def batches(self, split: str, *, stateful: bool = False, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """Yield batch dicts from batch index `start` on. `stateful` is irrelevant: reviews are independent."""
        s = self.splits[split]
        order = self._bucketed(s, epoch) if split == "train" else torch.argsort(s.kept, stable=True).split(self.batch_size)
        for rows in order[start:]:
            yield self.collate(s, rows)

    def _bucketed(self, s: Split, epoch: int) -> list[torch.Tensor]:
        """Batches of similar length in random order: a pure function of (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm, chunk = torch.randperm(len(s), generator=g), self.batch_size * self.bucket_chunks
        batches = []
        for c in range(0, len(s), chunk):  # only the last chunk can end in a short batch
            rows = perm[c : c + chunk]
            batches += rows[torch.argsort(s.kept[rows], stable=True)].split(self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=g)]

    def collate(self, s: Split, rows: torch.Tensor) -> dict:
        """(B,) review indices -> padded (B, T) vocabulary ids, truncated to max_len."""
        lengths, kept = s.lengths[rows], s.kept[rows]
        j = torch.arange(int(kept.max()))[None, :]  # (1, T) position among the kept tokens
        # past the head, skip what truncation drops: the middle (head+tail) or the start (tail)
        src = s.offsets[rows, None] + j + torch.where(j >= self.head, (lengths - kept)[:, None], 0)  # (B, T)
        valid = j < kept[:, None]
        tokens = self.to_vocab[self.ids[src.clamp(max=len(self.ids) - 1)]].masked_fill(~valid, PAD_ID)
        return {"tokens": tokens, "targets": s.labels[rows], "lengths": kept, "carry": False,
                "num_tokens": int(kept.sum()), "rows": rows}  # rows: which reviews of the split


class ReviewEncoder:
    """A checkpoint's text pipeline on its own: raw review -> (T,) ids with the run's tokenizer,
    vocabulary and truncation, and ids -> words. For predictions on new text."""

    def __init__(self, state: dict):
        self.itos, self.lowercase = list(state["itos"]), state["lowercase"]
        self.max_len, share = state["max_len"], HEAD[state["truncation"]]
        self.head = self.max_len if share is None else int(self.max_len * share)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, text: str) -> torch.Tensor:
        ids = [self.stoi.get(t, UNK_ID) for t in tokenize(text, self.lowercase)]  # [] when it has no token
        if len(ids) > self.max_len:  # the same policy as training's collate
            ids = ids[: self.head] + ids[len(ids) - (self.max_len - self.head):]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in ids)


def encode_text(text: str, state: dict) -> torch.Tensor:
    """New text -> (T,) ids with a checkpoint's vocabulary and truncation (for predictions)."""
    return ReviewEncoder(state).encode(text)
