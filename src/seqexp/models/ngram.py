"""Bag of n-grams with naive-Bayes-initialised weights: NBSVM (Wang & Manning, 2012) as a network.

The strong non-neural baseline for sentiment, trained by seqexp's loop: a review is the set of
distinct n-grams (n = 1..`n`) in it, and each n-gram votes for a class with a learned weight.
Two things make this work far better than a plain linear model on n-gram counts:
- binary features: an n-gram counts once per review, however often it is repeated;
- each feature's vote starts from its naive Bayes log-count ratio on the training reviews,
  r_c = log(p_c / |p_c|_1) (p_c: smoothed count of reviews of class c that contain it),
  and a learned gate scales it: logit_c = sum_f (w_f + w_adj) * r_fc / r_adj + b_c.
  This is fast.ai's "NBSVM++" form of Wang & Manning's interpolation; r is trained as well.
  With `train_r=false` r stays the naive Bayes ratios -- NBSVM's own form: a linear classifier
  (here logistic, L2 through the optimizer's weight_decay) on the binary features scaled by r --
  and `beta` < 1 applies Wang & Manning's interpolation at evaluation, w' = (1 - beta) * mean|w| +
  beta * w, on the effective weights w + w_adj: a pull of every vote towards naive Bayes.

The features are exact (no hashing): every n-gram of the training reviews seen at least
`min_count` times, at most `max_features` of them (the most frequent). Which those are, and
their ratios, depend on the training data: `prepare(batches)` computes them once before
training (train.py calls it on a fresh run). They are buffers and weights of fixed size, so a checkpoint
holds everything and loads into a freshly built model.

Order matters inside an n-gram but not between them: this is the sequence-free reference the
sequence models are measured against, and a strong member of an ensemble with them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from seqexp.errors import UserError, require
from seqexp.models.base import SequenceModel
from seqexp.models.layers import length_mask, lengths_or_full

log = logging.getLogger("seqexp")

NONE = torch.iinfo(torch.int64).max  # key of an empty feature slot: sorts after every real key


class NgramModel(SequenceModel):
    stateful = False  # reviews are independent

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        head: str,
        n: int = 3,  # uni-, bi- and trigrams
        max_features: int = 1_000_000,  # the most frequent n-grams of the training reviews
        min_count: int = 2,  # seen at least this often in training (rarer ones only memorise)
        smoothing: float = 1.0,  # added to each class's count in the naive Bayes ratio
        w_adj: float = 0.4,  # vote = (w + w_adj) * r / r_adj, fast.ai's NBSVM++ parametrisation
        r_adj: float = 10.0,
        train_r: bool = True,  # false: r stays the naive Bayes ratios (NBSVM's fixed feature scaling)
        beta: float = 1.0,  # < 1: Wang & Manning's interpolation at evaluation (1: none)
    ):
        super().__init__()
        if head != "classify":
            raise ValueError("the n-gram model is a classifier; it has no language-model head")
        # its naive Bayes ratios count each class's sequences: no real-valued target (data=adding)
        require(num_outputs >= 2, f"model=ngram classifies into classes; this data asks for {num_outputs} output "
                "(a regression). Use another model family.")
        # a k-gram's key is its ids as digits in base vocab_size, plus k in the top bits
        self.base, self.n = vocab_size, n
        if n * math.log2(max(vocab_size, 2)) > 58:
            raise ValueError(f"{n}-grams over a vocabulary of {vocab_size} do not fit 64-bit keys; lower model.n")
        self.max_features, self.min_count, self.smoothing = max_features, min_count, smoothing
        self.w_adj, self.r_adj, self.beta = w_adj, r_adj, beta
        self.register_buffer("keys", torch.full((max_features,), NONE, dtype=torch.int64))  # sorted
        # row 0 of each table is "no feature" (padding, unseen n-grams) and stays zero
        self.w = nn.Embedding(max_features + 1, 1, padding_idx=0)
        self.r = nn.Embedding(max_features + 1, num_outputs, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        nn.init.uniform_(self.w.weight, -0.1, 0.1)
        nn.init.zeros_(self.r.weight)
        self.r.weight.requires_grad_(train_r)  # frozen: the optimizer never sees it (build_optimizer)
        with torch.no_grad():
            self.w.weight[0] = 0.0

    @classmethod
    def describe(cls, m: dict) -> str:
        return f"{m['n']}-gram bag (NBSVM)"

    def state_size(self, seq_len: int) -> int:
        raise UserError("model=ngram has no state_size: a bag of n-grams reads the whole sequence at once and "
                        "carries nothing from one position to the next.")

    @classmethod
    def check_config(cls, cfg, head: str) -> None:
        require(head == "classify", "model=ngram is a bag of n-grams: it classifies (data=imdb) and cannot "
                "model language.")
        require(1 <= cfg.n <= 5, f"model.n must be in 1..5, got {cfg.n}.")
        require(cfg.max_features > 0 and cfg.min_count > 0, "model.max_features and model.min_count must be positive.")
        require(0.0 <= cfg.beta <= 1.0, f"model.beta interpolates between mean|w| (0) and w (1); got {cfg.beta}.")

    def ngram_keys(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T) ids -> (B, M) keys of the distinct n-grams of each row, sorted; NONE fills the rest."""
        lengths = lengths_or_full(tokens, lengths)
        t = tokens.long()
        keys, k_gram = [], t
        for k in range(1, self.n + 1):
            if k > 1:  # extend every (k-1)-gram by the token after it
                k_gram = k_gram[:, :-1] * self.base + t[:, k - 1:]
            if k_gram.shape[1] == 0:
                break
            valid = length_mask(lengths - (k - 1), k_gram.shape[1])  # the k-gram ends inside the review
            keys.append(torch.where(valid, k_gram + (k << 58), NONE))
        keys = torch.cat(keys, dim=1).sort(dim=1).values  # (B, M)
        repeat = torch.zeros_like(keys, dtype=torch.bool)
        repeat[:, 1:] = keys[:, 1:] == keys[:, :-1]  # binary features: each n-gram once per review
        return keys.masked_fill(repeat, NONE)

    def features(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T) ids -> (B, M) feature rows (1..max_features), 0 where an n-gram is not a feature."""
        keys = self.ngram_keys(tokens, lengths)
        idx = torch.searchsorted(self.keys, keys).clamp(max=self.max_features - 1)
        found = (self.keys[idx] == keys) & (keys != NONE)
        return torch.where(found, idx + 1, 0)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, state=None):
        """tokens (B, T) -> (logits (B, C), None)."""
        f = self.features(tokens, lengths)  # (B, M)
        w = self.w(f) + self.w_adj  # (B, M, 1)
        if self.beta != 1.0 and not self.training:  # the trained weights are what the interpolation reads
            w = (1.0 - self.beta) * self.mean_abs_weight() + self.beta * w
        votes = w * self.r(f)  # (B, M, C); row 0 of r is zero: no vote
        return votes.sum(1) / self.r_adj + self.bias, None

    def mean_abs_weight(self) -> torch.Tensor:
        """mean |w + w_adj| over the features (rows 1..F; the keys say how many: a checkpoint holds them)."""
        F = int((self.keys != NONE).sum())
        return (self.w.weight[1 : F + 1] + self.w_adj).abs().mean()

    @torch.no_grad()
    def prepare(self, batches: Callable[[], Iterable[dict]]) -> None:
        """Choose the features and set their naive Bayes ratios from the training batches
        (`batches()`: dicts with tokens, lengths, targets). Deterministic: a function of the
        reviews only, so every DDP rank computes the same."""
        t0 = time.perf_counter()
        keys, labels = [], []
        for b in batches():
            k = self.ngram_keys(b["tokens"], b["lengths"])  # (B, M)
            keep = k != NONE
            keys.append(k[keep])
            labels.append(b["targets"][:, None].expand_as(k)[keep])
        keys, labels = torch.cat(keys), torch.cat(labels)
        uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        chosen = torch.nonzero(counts >= self.min_count).flatten()
        # the most frequent; ties by key, so the choice never depends on the batch order
        chosen = chosen[torch.argsort(counts[chosen], descending=True, stable=True)[: self.max_features]]
        chosen = chosen.sort().values  # keys stay sorted for searchsorted
        F = len(chosen)
        self.keys.fill_(NONE)
        self.keys[:F] = uniq[chosen]
        row = torch.full((len(uniq),), -1, dtype=torch.long)
        row[chosen] = torch.arange(F)
        row = row[inverse]  # per occurrence: its feature row, -1 if not a feature
        C = self.r.weight.shape[1]
        per_class = torch.zeros(F, C, dtype=torch.float64)
        ok = row >= 0
        per_class.index_put_((row[ok], labels[ok]), torch.ones(int(ok.sum()), dtype=torch.float64), accumulate=True)
        p = per_class + self.smoothing  # (F, C): reviews of each class containing the feature
        r = torch.log(p / p.sum(0))
        r = r - r.mean(1, keepdim=True)  # only differences between classes matter
        self.r.weight.zero_()
        self.r.weight[1 : F + 1] = (r * self.r_adj).float()
        self.num_features = F
        log.info("model prepared from the training split in %.1f s (%d n-gram features)", time.perf_counter() - t0, F)
