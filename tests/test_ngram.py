"""The bag-of-n-grams classifier: exact binary features, naive Bayes initialisation, padding,
self-contained checkpoints, and its config checks."""

from __future__ import annotations

import pytest
import torch

from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.models.ngram import NONE, NgramModel
from tests.helpers import make_cfg

V = 10


def model(**kw) -> NgramModel:
    torch.manual_seed(0)
    return NgramModel(vocab_size=V, num_outputs=2, head="classify", **{"max_features": 50, "min_count": 1, **kw})


def batch(rows: list[list[int]], labels: list[int]) -> dict:
    T = max(map(len, rows))
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return {"tokens": tokens, "lengths": torch.tensor([len(r) for r in rows]), "targets": torch.tensor(labels)}


def test_keys_are_the_distinct_ngrams_of_the_valid_tokens():
    m = model(n=2)
    b = batch([[3, 4, 3, 4], [5]], [0, 1])
    b["tokens"][1, 1:] = 7  # garbage in the padding must not count
    keys = m.ngram_keys(b["tokens"], b["lengths"])
    row0 = sorted(k for k in keys[0].tolist() if k != NONE)
    # unigrams 3, 4 and bigrams (3,4), (4,3): each once, however often it occurs
    assert row0 == sorted([3 + (1 << 58), 4 + (1 << 58), 3 * V + 4 + (2 << 58), 4 * V + 3 + (2 << 58)])
    assert [k for k in keys[1].tolist() if k != NONE] == [5 + (1 << 58)]


def test_prepare_picks_frequent_ngrams_and_their_naive_bayes_sign():
    m = model(n=2, min_count=2)
    # "3 4" occurs only in positive reviews, "5" only in negative ones, "6" in both; "8" once
    b = batch([[3, 4, 6], [3, 4, 2], [5, 6], [5, 8]], [1, 1, 0, 0])
    m.prepare(lambda: [b])
    assert m.num_features == 5  # 3, 4, (3,4), 5, 6
    f = m.features(*(batch([[3, 4], [5], [6], [8]], [0, 0, 0, 0])[k] for k in ("tokens", "lengths")))
    assert (f[3] == 0).all()  # "8" was seen once: not a feature
    r = m.r.weight
    pos_vote = lambda row: (r[row[row > 0]][:, 1] - r[row[row > 0]][:, 0]).sum()  # noqa: E731
    assert pos_vote(f[0]) > 0 and pos_vote(f[1]) < 0
    assert pos_vote(f[2]).abs() < min(pos_vote(f[0]), -pos_vote(f[1]))  # in both classes: a weak vote
    with torch.no_grad():
        logits, _ = m(*(batch([[3, 4], [5]], [1, 0])[k] for k in ("tokens", "lengths")))
    assert logits[0, 1] > logits[0, 0] and logits[1, 0] > logits[1, 1]  # right before any training step


def test_prepare_keeps_the_most_frequent_when_capped():
    m = model(n=1, max_features=2)
    m.prepare(lambda: [batch([[3, 3, 4], [3, 4, 5], [3, 4, 6]], [0, 1, 1])])
    assert m.num_features == 2
    assert m.keys[:2].tolist() == [3 + (1 << 58), 4 + (1 << 58)] and (m.keys[2:] == NONE).all()


def test_padding_never_changes_the_logits():
    m = model(n=3)
    m.prepare(lambda: [batch([[1, 2, 3, 4], [2, 3, 4, 5, 6, 7]], [0, 1])])
    alone, _ = m(torch.tensor([[2, 3, 4]]), torch.tensor([3]))
    padded = torch.tensor([[2, 3, 4, 9, 9, 9], [1, 2, 3, 4, 5, 6]])
    together, _ = m(padded, torch.tensor([3, 6]))
    torch.testing.assert_close(together[0], alone[0])


def test_a_checkpoint_loads_into_a_freshly_built_model():
    m = model(n=2)
    m.prepare(lambda: [batch([[1, 2, 3], [4, 5]], [0, 1])])
    x, lengths = torch.tensor([[1, 2, 5]]), torch.tensor([3])
    fresh = model(n=2)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x, lengths)[0], m(x, lengths)[0])


def test_gradients_reach_the_votes_and_gates():
    m = model(n=2)
    m.prepare(lambda: [batch([[1, 2, 3], [4, 5]], [0, 1])])
    logits, _ = m(*(batch([[1, 2], [4, 5]], [0, 1])[k] for k in ("tokens", "lengths")))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.r.weight.grad[0].abs().sum() == 0  # "no feature" never votes


def test_keys_that_would_overflow_are_refused():
    with pytest.raises(ValueError, match="64-bit"):
        NgramModel(vocab_size=2_000_000, num_outputs=2, head="classify", n=3)


def test_the_ngram_model_refuses_language_modelling_at_compose_time():
    with pytest.raises(UserError, match="model=ngram"):
        validate(make_cfg("model=ngram"))  # default data: the char corpus
    validate(make_cfg("model=ngram", "data=imdb"))
