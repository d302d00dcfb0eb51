"""Local attention (`model.window`): causal and bidirectional, the usual guarantees (causality,
padding never changes a logit), a reach of exactly n_layers x window, and on copy memory a model
that learns when the symbols are within its window and is at chance one position beyond.
"""

from __future__ import annotations

import pytest
import torch

from seqexp.models.attention import AttentionModel
from seqexp.train import train
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 11, 24


def model(head: str, window: int, n_layers: int = 2, **kw) -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel(vocab_size=V, num_outputs=V if head == "lm" else 3, head=head, max_len=T, d_model=16,
                          n_heads=2, n_layers=n_layers, window=window, **kw).eval()


def changed(m: AttentionModel, x: torch.Tensor, where: int) -> torch.Tensor:
    """(T,) bool: which positions' logits change when the token at `where` changes."""
    y = x.clone()
    y[:, where] = (y[:, where] % (V - 1)) + 1
    with torch.no_grad():
        return ((m(x)[0] - m(y)[0]).abs().amax(-1) > 1e-6)[0]


@pytest.mark.parametrize("positional", ["learned", "alibi"])
@pytest.mark.parametrize("window", [1, 3])
def test_a_causal_window_reads_exactly_n_layers_x_window_back_and_nothing_ahead(window, positional):
    m = model("lm", window, positional=positional)
    x = torch.randint(1, V, (1, T))
    where = 5
    reach = 2 * window  # two layers
    hit = changed(m, x, where)
    assert not hit[:where].any()  # causality
    assert hit[where : where + reach + 1].all()  # within the reach every logit depends on it
    assert not hit[where + reach + 1 :].any()  # one position beyond: exactly nothing


def test_a_window_as_wide_as_the_sequence_is_global_attention():
    x = torch.randint(1, V, (2, T))
    for head in ("lm", "classify"):
        with torch.no_grad():
            torch.testing.assert_close(model(head, T)(x)[0], model(head, 0)(x)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "alibi"])
def test_a_bidirectional_window_sees_both_sides_and_padding_never_changes_a_logit(positional):
    # attention pooling weighs a padded position by 0, and 0 x NaN is NaN: no padded state may be
    # NaN, whatever the kernel does with a query that has no key left (the explicit path: NaN)
    m = model("classify", 2, n_layers=1, positional=positional, pooling="attention")
    lengths = torch.tensor([T, 9, 3])
    x = torch.randint(1, V, (3, T))
    garbage = x.clone()
    garbage[1, 9:], garbage[2, 3:] = 1, 7  # whatever sits in the padding
    with torch.no_grad():
        a, _ = m(x, lengths)
        b, _ = m(garbage, lengths)
        alone = torch.cat([m(x[i : i + 1, : int(L)], lengths[i : i + 1])[0] for i, L in enumerate(lengths)])
    assert torch.isfinite(a).all()  # a padded query beyond every real token's window is no NaN
    with torch.no_grad():
        assert all(torch.isfinite(w).all() for w in m(x, lengths, None, need_weights=True)[1])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, alone, rtol=0, atol=1e-5)  # the same as each sequence batched alone
    states = {}  # the encoder's states before pooling: which positions a token reaches
    m.ln_f.register_forward_hook(lambda mod, inp, out: states.__setitem__("h", out))
    y = x[:1].clone()
    with torch.no_grad():
        m(x[:1])
        before = states["h"]
        y[0, 10] = (y[0, 10] % (V - 1)) + 1
        m(y)
    hit = ((states["h"] - before).abs().amax(-1) > 1e-6)[0]
    assert hit.nonzero().flatten().tolist() == [8, 9, 10, 11, 12]  # both sides, exactly 2 away


def copy_run(tmp_path, window: int) -> dict:
    """Copy 3 symbols over a gap of 5: each answer is T + M = 8 positions after its symbol."""
    return train(make_cfg("data=copy", "data.length=5", "data.num_symbols=3", "data.alphabet=4", "data.size=2000",
                          "data.eval_size=200", "model=attention", "model.d_model=32", "model.n_heads=2",
                          "model.n_layers=1", f"model.window={window}", "optimizer.lr=3e-3",
                          "scheduler.warmup_steps=10", "trainer.max_steps=100", "trainer.eval_every=50",
                          "trainer.progress=false", "trainer.device=cpu", "logging.tensorboard=false"),
                 tmp_path / f"w{window}")["best"]


def test_on_copy_a_window_learns_up_to_its_reach_and_is_at_chance_one_position_beyond(tmp_path):
    assert copy_run(tmp_path, 8)["val/exact"] >= 0.95
    beyond = copy_run(tmp_path, 7)
    assert beyond["val/acc"] < 0.4 and beyond["val/exact"] < 0.1  # chance: 1 in 4 per symbol
