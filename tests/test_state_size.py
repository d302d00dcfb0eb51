"""`SequenceModel.state_size(seq_len)`: the numbers of state a model carries to read position
seq_len, from the model itself (the memory lab's state-size axis). Values checked by hand; every
family of configs/model/ either gives a positive count or refuses in one line."""

from __future__ import annotations

import pytest

from seqexp.build import build_model
from seqexp.configs import CONFIG_DIR
from seqexp.config import validate
from seqexp.errors import UserError
from tests.helpers import SEARCH, lm_capable, make_cfg

FAMILIES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
LM = dict(vocab_size=12, num_outputs=12, head="lm", max_len=256)


def model(*overrides: str, kwargs: dict = LM):
    cfg = make_cfg(*overrides)
    if kwargs["head"] == "lm":  # the default data (char) is a language model's; a classifier is built as is
        validate(cfg)
    return build_model(cfg.model, kwargs)


@pytest.mark.parametrize("overrides, seq_len, expected", [
    # recurrences: layers x hidden, whatever the length (LSTM: h and c)
    (["model=lstm", "model.num_layers=2", "model.hidden_size=64"], 100, 2 * 2 * 64),
    (["model=lstm", "model.num_layers=1", "model.hidden_size=64"], 7, 1 * 2 * 64),
    (["model=gru", "model.num_layers=2", "model.hidden_size=32"], 100, 2 * 32),
    (["model=rnn", "model.num_layers=1", "model.hidden_size=128"], 100, 128),
    (["model=mingru", "model.num_layers=2", "model.hidden_size=64"], 100, 2 * 64),
    (["model=minlstm", "model.num_layers=3", "model.hidden_size=16"], 100, 3 * 16),  # no cell state besides h
    # attention: a key and a value of d_model per layer for each earlier position it sees
    (["model=attention", "model.n_layers=2", "model.d_model=64"], 100, 2 * 2 * 64 * 100),
    (["model=attention", "model.n_layers=2", "model.d_model=64"], 50, 2 * 2 * 64 * 50),
    (["model=attention", "model.n_layers=2", "model.d_model=64", "model.window=16"], 100, 2 * 2 * 64 * 16),
    (["model=attention", "model.n_layers=2", "model.d_model=64", "model.window=16"], 10, 2 * 2 * 64 * 10),
    # a width-4 convolution also keeps the 3 inputs before each position, per layer
    (["model=attention", "model.n_layers=2", "model.d_model=64", "model.conv_kernel=4"], 100, 2 * 64 * (2 * 100 + 3)),
    # Mamba: per layer the convolution's 3 inputs and 16 states of each of its E = 2 x 32 channels
    (["model=mamba", "model.num_layers=2", "model.d_model=32", "model.d_state=16", "model.d_conv=4"], 100,
     2 * (3 * 64 + 64 * 16)),
    # DeltaNet: per layer 3 inputs of q, k and v (3 x 32 channels) and 4 heads' 8 x 8 states
    (["model=deltanet", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_conv=4"], 100,
     2 * (3 * 96 + 4 * 8 * 8)),
], ids=lambda v: "-".join(v) if isinstance(v, list) else str(v))
def test_state_size_by_hand(overrides, seq_len, expected):
    assert model(*overrides).state_size(seq_len) == expected


def test_a_bidirectional_classifier_carries_both_directions():
    kw = dict(vocab_size=12, num_outputs=2, head="classify", max_len=64)
    assert model("model=lstm", "model.num_layers=2", "model.hidden_size=8", "model.bidirectional=true",
                 kwargs=kw).state_size(64) == 2 * 2 * 2 * 8
    assert model("model=mingru", "model.num_layers=1", "model.hidden_size=8", "model.bidirectional=true",
                 kwargs=kw).state_size(64) == 2 * 8


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_counts_its_state_or_refuses_in_one_line(family):
    """A family that carries a state from one chunk to the next (stateful) must count it; another
    (a bag of n-grams) may refuse, in one line."""
    kw = LM if lm_capable(family) else dict(vocab_size=12, num_outputs=2, head="classify", max_len=64)
    m = model(f"model={family}", kwargs=kw)
    try:
        n = m.state_size(64)
    except UserError as e:
        assert not m.stateful and len(str(e).splitlines()) == 1 and "state" in str(e), family
        return
    assert isinstance(n, int) and n > 0


def test_a_family_that_does_not_say_refuses_by_default():
    """The extension's model (tests/extension) never heard of state_size: SequenceModel's default."""
    m = model(SEARCH, "model=conv")
    with pytest.raises(UserError, match="ConvModel does not define state_size"):
        m.state_size(10)
