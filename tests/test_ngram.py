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


def prepared(**kw) -> NgramModel:
    m = model(n=2, **kw)
    m.prepare(lambda: [batch([[1, 2, 3], [1, 2, 4], [4, 5, 6], [5, 6, 3]], [0, 0, 1, 1])])
    with torch.no_grad():  # trained-looking weights: not all equal, some negative
        m.w.weight[1:].uniform_(-1.0, 1.0)
    return m


X, LENGTHS = torch.tensor([[1, 2, 5], [4, 5, 6]]), torch.tensor([3, 3])


def test_fixed_ratios_get_no_update_and_the_gates_still_train():
    m = prepared(train_r=False)
    r0, w0 = m.r.weight.detach().clone(), m.w.weight.detach().clone()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-2)
    logits, _ = m(X, LENGTHS)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    opt.step()
    torch.testing.assert_close(m.r.weight, r0)  # NBSVM's feature scaling stays the naive Bayes ratios
    assert not torch.equal(m.w.weight, w0)
    assert m.r.weight.requires_grad is False and model().r.weight.requires_grad  # the default trains r


def test_interpolation_applies_at_evaluation_and_is_linear_in_beta():
    logits = {}
    for beta in (1.0, 0.0, 0.25):  # the same trained weights each time (seeded)
        m = prepared(beta=beta).eval()
        with torch.no_grad():
            logits[beta], _ = m(X, LENGTHS)
        m.train()  # training reads the weights as they are, whatever beta
        torch.testing.assert_close(m(X, LENGTHS)[0], logits[1.0])
    torch.testing.assert_close(logits[0.25], 0.75 * logits[0.0] + 0.25 * logits[1.0])
    # beta = 0: every feature votes with one weight, mean|w + w_adj|: naive Bayes, scaled
    m = prepared()
    f = m.features(X, LENGTHS)
    nb = m.r(f).sum(1) / m.r_adj  # (B, C)
    torch.testing.assert_close(logits[0.0], m.mean_abs_weight() * nb + m.bias)
    assert not torch.allclose(logits[0.0], logits[1.0])


def test_fixed_ratios_and_interpolation_survive_a_checkpoint_round_trip():
    m = prepared(train_r=False, beta=0.25).eval()
    fresh = model(n=2, train_r=False, beta=0.25).eval()  # never prepared: the checkpoint says which features
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X, LENGTHS)[0], m(X, LENGTHS)[0])
    assert fresh.mean_abs_weight() == m.mean_abs_weight()


def test_beta_outside_0_1_is_refused():
    with pytest.raises(UserError, match="model.beta"):
        validate(make_cfg("model=ngram", "data=imdb", "model.beta=1.5"))
