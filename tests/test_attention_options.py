"""The modern block's options of model=attention (rotary, qk_norm, mlp, zero_init, logit_softcap,
an untied head): each keeps the family's guarantees -- shapes, causality, padding never changing a
classifier's logit, the fused path equal to the explicit one, gradients reaching every parameter
-- and does what it is for: rotary positions are relative, QK-norm bounds the scores,
soft-capping bounds the logits, zero-initialised projections make every block the identity.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.models.attention import AttentionModel, rotary_tables, rotate
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

V, C, T = 23, 2, 12
OPTIONS = {
    "rotary": {"positional": "rotary"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "zero_init": {"zero_init": True},
    "softcap": {"logit_softcap": 2.0},
    "untied": {"tie_weights": False},
    "all": {"positional": "rotary", "qk_norm": True, "mlp": "swiglu", "zero_init": True, "logit_softcap": 2.0,
            "tie_weights": False, "conv_kernel": 3},
}


def build(head: str, **kw) -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel(vocab_size=V, num_outputs=V if head == "lm" else C, head=head, max_len=32, d_model=32,
                          n_heads=4, n_layers=2, **kw)


def wake(model: AttentionModel) -> AttentionModel:
    """Zero-initialised projections pass no gradient to the rest of their block until they have
    moved: one step of plain SGD."""
    x = torch.randint(V, (4, T))
    logits, _ = model(x) if model.lm else model(x, torch.full((4,), T))
    loss = F.cross_entropy(logits.flatten(0, 1), x.flatten()) if model.lm else F.cross_entropy(logits, x[:, 0] % C)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("option", OPTIONS)
def test_lm_shapes_and_causality(option):
    model = build("lm", **OPTIONS[option]).eval()
    if option in ("zero_init", "all"):
        wake(model)  # else every block is the identity and causality holds trivially
    x = torch.randint(V, (2, T))
    base, state = model(x)
    assert base.shape == (2, T, V) and state is None
    for t in (0, 5, T - 1):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out, _ = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("option", OPTIONS)
def test_classify_padding_never_changes_a_logit_and_the_fused_path_equals_the_explicit_one(option):
    model = build("classify", pooling="mean", **OPTIONS[option]).eval()
    wake(model)
    x = torch.randint(1, V, (3, T))
    lengths = torch.tensor([T, 7, 2])
    logits, _ = model(x, lengths)
    assert logits.shape == (3, C)
    garbage = x.clone()
    garbage[torch.arange(T)[None, :] >= lengths[:, None]] = 5
    torch.testing.assert_close(model(garbage, lengths)[0], logits, rtol=0, atol=1e-5)
    explicit, maps = model(x, lengths, need_weights=True)
    torch.testing.assert_close(explicit, logits, rtol=1e-5, atol=1e-5)
    assert maps[0][1, :, :, 7:].abs().max() == 0  # no attention to padding


@pytest.mark.parametrize("head", ["lm", "classify"])
@pytest.mark.parametrize("option", OPTIONS)
def test_gradients_reach_every_parameter(option, head):
    model = build(head, **({"pooling": "attention"} if head == "classify" else {}), **OPTIONS[option])
    if OPTIONS[option].get("zero_init"):
        wake(model)
    x = torch.randint(V, (4, T))
    logits, _ = model(x, torch.tensor([T, 9, 5, 2]) if head == "classify" else None)
    target = x.flatten() if head == "lm" else torch.tensor([0, 1, 1, 0])
    F.cross_entropy(logits.flatten(0, -2) if head == "lm" else logits, target).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"no gradient reaches {dead}"


def test_the_defaults_are_the_model_before_the_options():
    """Every option off builds the same parameters, drawn from the same random numbers, as a
    model that names none of them (runs saved before the options load and train on alike:
    tests/test_legacy_runs.py)."""
    off = dict(positional="learned", qk_norm=False, mlp="gelu", zero_init=False, logit_softcap=None, tie_weights=True)
    a, b = build("lm"), build("lm", **off)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not any(("norm" in n and "attn" in n) for n, _ in a.named_parameters())


def test_rotary_scores_depend_on_the_distance_only():
    """q_i . k_j after the rotation is the same for positions (i + s, j + s) as for (i, j)."""
    torch.manual_seed(0)
    hs = 8
    q, k = torch.randn(1, 1, T, hs), torch.randn(1, 1, T, hs)
    for s in (0, 3, 100):
        cos, sin = rotary_tables(torch.arange(T) + s, hs)
        scores = rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-2, -1)
        if s == 0:
            first = scores
        torch.testing.assert_close(scores, first, rtol=1e-4, atol=1e-4)
    qq = q[:, :, :1].expand(1, 1, T, hs)  # one query and one key everywhere: the score is a function of i - j
    kk = k[:, :, :1].expand(1, 1, T, hs)
    cos, sin = rotary_tables(torch.arange(T), hs)
    scores = (rotate(qq, cos, sin) @ rotate(kk, cos, sin).transpose(-2, -1))[0, 0]
    for d in range(-3, 4):
        diag = scores.diagonal(d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positional", ["rotary", "learned"])
def test_rotary_with_a_window_reads_the_same_context_alike_at_every_position(positional):
    """With local attention (model.window) a logit reads n_layers x window tokens back; with
    rotary positions the same tokens there give the same logit wherever they stand (absolute
    positions shift, relative ones do not). A learned table tells the positions apart."""
    model = build("lm", positional=positional, window=2).eval()
    period = 7
    x = torch.randint(V, (1, period)).repeat(1, 4)[:, :T + 8]  # (1, 28): x[t] = x[t + 7]
    if positional == "learned":
        model.pos_emb = torch.nn.Parameter(torch.randn(32, 32) * 0.5)  # (a trained table's scale)
    with torch.no_grad():
        logits, _ = model(x)
    same = torch.allclose(logits[0, 4:-period], logits[0, 4 + period:], atol=1e-5)  # 4 = 2 layers x window 2
    assert same == (positional == "rotary")


def test_qk_norm_bounds_the_scores():
    """Queries and keys of unit RMS per head (gain 1 at first): |q . k| / sqrt(hs) <= sqrt(hs) however
    large the inputs, so a softmax row's weights differ by at most exp(2 sqrt(hs)); without it
    large weights make attention one-hot."""
    T_ = 8
    for qk_norm in (True, False):
        model = build("lm", qk_norm=qk_norm, positional="rotary").eval()
        attn = model.blocks[0].attn
        with torch.no_grad():
            attn.qkv.weight.mul_(1000.0)
            _, maps = model(torch.randint(V, (2, T_)), need_weights=True)
        w = maps[0][:, :, -1, :]  # (B, nh, T): the last query sees every key
        ratio = w.amax(-1) / w.amin(-1)
        hs = 32 // 4
        if qk_norm:
            assert (ratio <= math.exp(2 * math.sqrt(hs)) * 1.001).all(), ratio.max()
        else:
            assert (ratio > math.exp(2 * math.sqrt(hs))).any()


@pytest.mark.parametrize("head", ["lm", "classify"])
def test_soft_capping_bounds_the_logits(head):
    cap = 3.0
    model = build(head, logit_softcap=cap, tie_weights=False).eval()
    with torch.no_grad():
        model.head.weight.mul_(1e4)
        logits, _ = model(torch.randint(V, (2, T)), torch.tensor([T, 4]) if head == "classify" else None)
        uncapped = build(head, tie_weights=False).eval()
        uncapped.head.weight.mul_(1e4)
        raw, _ = uncapped(torch.randint(V, (2, T)), torch.tensor([T, 4]) if head == "classify" else None)
    assert logits.abs().max() <= cap < raw.abs().max()


def test_zero_init_makes_every_block_the_identity_at_first():
    model = build("lm", zero_init=True).eval()
    x = torch.randint(V, (2, T))
    with torch.no_grad():
        logits, _ = model(x)
        expect = model.head(model.ln_f(model.tok_emb(x) + model.pos_emb[:T]))
    torch.testing.assert_close(logits, expect)
    assert build("lm").blocks[0].attn.proj.weight.any()  # and not without it


def test_swiglu_keeps_the_feed_forwards_parameter_count():
    count = lambda m: sum(p.numel() for p in m.blocks[0].mlp.parameters())
    gelu, swiglu = count(build("lm")), count(build("lm", mlp="swiglu"))
    assert abs(swiglu - gelu) / gelu < 0.01, (gelu, swiglu)


@pytest.mark.parametrize("override,key", [
    ("model.logit_softcap=-1", "model.logit_softcap"),
    ("model.d_model=36", "model.positional"),  # 36 / 4 heads = 9: an odd head size has no pairs to turn
])
def test_invalid_values_fail_before_work_naming_the_key(override, key):
    cfg = make_cfg("model=attention", "model.positional=rotary", override)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_an_unknown_feed_forward_fails_while_composing():
    with pytest.raises(Exception, match="mlp"):
        make_cfg("model=attention", "model.mlp=relu3")
