"""Model behaviour: shapes, causality, gradients, over-fitting, padding invariance, state carrying."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqexp.models.attention import AttentionModel, LocalConv
from seqexp.models.layers import embed_words
from seqexp.models.recurrent import RecurrentModel
from tests.helpers import make_cfg, overfit_lm, tiny_overrides

V, C = 23, 2
# alibi: attention with positional=alibi; conv: attention with a convolution opening each block
MODELS = ["rnn", "lstm", "gru", "attention", "alibi", "conv"]
ATTENTION = ("attention", "alibi", "conv")


def build(name: str, head: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, num_outputs=V if head == "lm" else C, head=head)
    if name == "alibi":
        name, kw = "attention", {"positional": "alibi", **kw}
    if name == "conv":
        name, kw = "attention", {"conv_kernel": 3, **kw}
    if name == "attention":
        return AttentionModel(**common, max_len=64, d_model=32, n_heads=4, n_layers=2, dropout=0.0, **kw)
    return RecurrentModel(**common, cell=name, embed_dim=16, hidden_size=32, num_layers=2, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name):
    x = torch.randint(V, (3, 10))
    logits, state = build(name, "lm")(x)
    assert logits.shape == (3, 10, V)
    assert (state is None) == (name in ATTENTION)
    logits, _ = build(name, "classify")(x, torch.tensor([10, 4, 1]))
    assert logits.shape == (3, C)


@pytest.mark.parametrize("name", MODELS)
def test_lm_is_causal(name):
    """Changing the token at position t never changes the logits before t."""
    model = build(name, "lm").eval()
    x = torch.randint(V, (2, 20))
    base, _ = model(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out, _ = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])  # and the change is seen from t on


@pytest.mark.parametrize("head", ["lm", "classify"])
@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name, head):
    kw = {"pooling": "attention"} if head == "classify" else {}
    if head == "classify" and name not in ATTENTION:
        kw["bidirectional"] = True  # both directions' modules must learn
    model = build(name, head, **kw)
    x = torch.randint(V, (4, 12))
    lengths = torch.tensor([12, 9, 5, 2])
    logits, _ = model(x, lengths if head == "classify" else None)
    target = x if head == "lm" else torch.tensor([0, 1, 1, 0])
    F.cross_entropy(logits.flatten(0, -2) if head == "lm" else logits, target.flatten()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"


@pytest.mark.parametrize("name", MODELS)
def test_overfits_one_batch(name):
    loss = overfit_lm(build(name, "lm"), V, steps=200)
    assert loss < 0.05, loss


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(name, pooling):
    """A sequence's logits are the same alone or batched with much longer, padded neighbours."""
    kw = {"pooling": pooling}
    if name not in ATTENTION:
        kw["bidirectional"] = True
    model = build(name, "classify", **kw).eval()
    short = torch.randint(1, V, (1, 5))
    alone, _ = model(short, torch.tensor([5]))
    batch = torch.zeros(3, 60, dtype=torch.long)  # pad id 0
    batch[0, :5] = short[0]
    batch[1:] = torch.randint(1, V, (2, 60))
    # garbage in the padding must not matter either
    batch[0, 5:] = torch.randint(1, V, (55,))
    together, _ = model(batch, torch.tensor([5, 60, 41]))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "max"])
@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_padded_path_equals_packed_path(name, pooling):
    """The CPU path (per-sequence reversal, no packing) computes exactly what packed sequences --
    the CUDA path -- compute: same logits, same gradient for every parameter."""
    model = build(name, "classify", bidirectional=True, pooling=pooling, dropout=0.0)
    x = torch.randint(1, V, (4, 15))
    lengths = torch.tensor([15, 3, 9, 1])
    y = torch.tensor([0, 1, 1, 0])
    results = []
    for pack in (False, True):
        model.pack = pack
        model.zero_grad()
        logits, _ = model(x, lengths)
        F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in results[0][1])


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_backward_direction_reads_each_sequence_from_its_own_end(name):
    """With last-state pooling, the backward half is the state after reading the valid tokens
    from the last one back to the first: the same as a forward pass over the reversed tokens."""
    model = build(name, "classify", bidirectional=True, pooling="last").eval()
    model.layers = model.layers[:1]  # one layer: the halves are then separable
    x = torch.randint(1, V, (1, 7))
    emb = model.embed(x)
    fwd, bwd = model.layers[0]
    with torch.no_grad():
        padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
        head_in = {}
        model.head.register_forward_hook(lambda m, inp, out: head_in.setdefault("v", inp[0]))
        model(padded, torch.tensor([7]))
        expected = torch.cat([fwd(emb)[0][:, -1], bwd(emb.flip(1))[0][:, -1]], -1)
    torch.testing.assert_close(head_in["v"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_state_carries_across_chunks(name):
    """Two chunks with the state carried give exactly the logits of one long pass."""
    model = build(name, "lm").eval()
    x = torch.randint(V, (2, 30))
    whole, _ = model(x)
    first, state = model(x[:, :18])
    second, _ = model(x[:, 18:], None, state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    fresh, _ = model(x[:, 18:])
    assert not torch.allclose(fresh, second, atol=1e-4)  # the state really matters


def test_tied_weights_share_storage():
    model = build("attention", "lm")
    assert model.head.weight is model.tok_emb.weight


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_maps_match_fused_path(name):
    model = build(name, "classify").eval()
    x = torch.randint(V, (2, 9))
    lengths = torch.tensor([9, 4])
    fused, _ = model(x, lengths)
    explicit, maps = model(x, lengths, need_weights=True)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 9, 9)
    assert maps[0][1, :, :, 4:].abs().max() == 0  # no attention to padding


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_tokens_are_not_drowned_by_positions(positional):
    """At initialisation the positional signal is no louder than the token embeddings, so the
    input of the first block still tells tokens apart (an unscaled sinusoid was 50x louder)."""
    torch.manual_seed(0)
    model = AttentionModel(vocab_size=V, num_outputs=C, head="classify", max_len=64, d_model=32, n_heads=4,
                           n_layers=1, positional=positional)
    pos_rms = model.pos_emb.pow(2).mean().sqrt()
    tok_rms = model.tok_emb.weight.pow(2).mean().sqrt()
    assert pos_rms <= 1.5 * tok_rms, (pos_rms, tok_rms)


@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_convolution_reads_its_window_only(kernel, causal):
    """A change at position 5 reaches exactly the positions whose window covers it: 4..6 for a
    width-3 encoder convolution (3..6 for width 4: one token left, two right), 5..5+k-1 for a
    causal one."""
    conv = LocalConv(8, kernel, dropout=0.0, causal=causal).eval()
    x = torch.randn(1, 12, 8)
    y = x.clone()
    y[:, 5] = torch.randn(8)  # not a constant shift, which the LayerNorm before the convolution removes
    changed = (conv(y, None) - conv(x, None)).abs().sum(-1)[0] > 1e-5
    first = 5 if causal else 5 - (kernel - 1 - (kernel - 1) // 2)
    assert changed.nonzero().flatten().tolist() == list(range(first, first + kernel))


@pytest.mark.parametrize("head", ["lm", "classify"])
def test_alibi_penalises_attention_by_distance(head):
    """With every query-key score equal, ALiBi's attention weights fall off as exp(-slope * |i - j|)
    over the keys a query may see: head h with slope 2^(-8(h+1)/nh); nothing else knows positions."""
    model = build("alibi", head).eval()
    assert not any("pos" in n for n, _ in model.named_parameters())
    torch.nn.init.zeros_(model.blocks[0].attn.qkv.weight)  # equal scores: only the bias remains
    torch.nn.init.zeros_(model.blocks[0].attn.qkv.bias)
    T = 9
    _, maps = model(torch.randint(V, (1, T)), torch.tensor([T]) if head == "classify" else None, need_weights=True)
    dist = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs().float()  # (T, T)
    for h in range(4):
        expect = torch.exp(-(2.0 ** (-8.0 * (h + 1) / 4)) * dist)
        if head == "lm":
            expect = expect.tril()
        torch.testing.assert_close(maps[0][0, h], expect / expect.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_word_dropout_drops_word_types_while_training_only():
    """Each training step zeroes a fraction p of the vocabulary at every occurrence and scales the
    rest by 1/(1-p); evaluation is the plain lookup."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(1000, 8)
    tokens = torch.randint(1000, (16, 50))
    embed.eval()
    torch.testing.assert_close(embed_words(embed, tokens, 0.5), embed(tokens))
    embed.train()
    out = embed_words(embed, tokens, 0.5)
    ratio = (out / embed(tokens))[..., 0]  # (B, T): 0 or 2 at each position
    dropped = ratio == 0
    assert torch.allclose(ratio[~dropped], torch.tensor(2.0))
    for w in tokens.unique():  # a word is dropped everywhere in the batch or nowhere
        at = dropped[tokens == w]
        assert at.all() or not at.any()
    frac = torch.stack([dropped[tokens == w][0] for w in tokens.unique()]).float().mean()
    assert 0.4 < frac < 0.6, frac


@pytest.mark.parametrize("name", MODELS)
def test_word_dropout_is_off_in_eval_mode(name):
    model = build(name, "classify", word_dropout=0.4)
    x, lengths = torch.randint(V, (3, 12)), torch.tensor([12, 7, 3])
    plain = build(name, "classify")
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x, lengths)[0], plain.eval()(x, lengths)[0])
    model.train()
    assert not torch.allclose(model(x, lengths)[0], plain.eval()(x, lengths)[0])


def test_attention_dropout_at_zero_is_identity_with_the_same_state_dict():
    """p = 0 builds no dropout module (no F.dropout call each step); the keys are those of p > 0, so a
    checkpoint of either loads into the other, and training mode computes what eval mode does."""
    kw = dict(vocab_size=V, num_outputs=V, head="lm", max_len=16, d_model=32, n_heads=4, n_layers=2,
              conv_kernel=3)
    off, on = AttentionModel(**kw, dropout=0.0), AttentionModel(**kw, dropout=0.1)
    assert not any(isinstance(m, torch.nn.Dropout) for m in off.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in on.modules()) == 1 + 2 * 3  # embeddings; conv, mlp, attn out
    assert off.state_dict().keys() == on.state_dict().keys()
    off.load_state_dict(on.state_dict())
    x = torch.randint(V, (2, 16))
    torch.testing.assert_close(off.train()(x)[0], off.eval()(x)[0], rtol=0, atol=0)


def test_every_training_step_runs_in_training_mode_after_evaluations(tiny_text, tmp_path, monkeypatch):
    """The trainer switches the model back to training mode only when it is not (train() walks every
    module): after each evaluation and text sample every module trains again, so dropout > 0 applies."""
    from seqexp.train import train
    from seqexp.update import Update

    seen, in_step, forward, update = [], [False], AttentionModel.forward, Update.__call__

    def spy(self, *args, **kw):  # (in a training step?, every module in training mode?)
        seen.append((in_step[0], all(m.training for m in self.modules())))
        return forward(self, *args, **kw)

    def step(self, *args):
        in_step[0] = True
        try:
            return update(self, *args)
        finally:
            in_step[0] = False

    monkeypatch.setattr(AttentionModel, "forward", spy)
    monkeypatch.setattr(Update, "__call__", step)
    train(make_cfg(*tiny_overrides("attention", tiny_text, "model.dropout=0.1", "trainer.max_steps=4",
                                   "trainer.eval_every=2", "trainer.checkpoint_every=2",
                                   "logging.tensorboard=false")), tmp_path)  # (no figures: faster)
    steps = [mode for stepping, mode in seen if stepping]
    assert len(steps) == 4 and all(steps)
    assert not all(mode for stepping, mode in seen[:len(seen) // 2] if not stepping)  # eval mode in between
