"""minGRU and minLSTM (models/minrnn.py): the chunked linear-space scan and the log-space scan
compute what the step loop computes, and the family keeps the contracts of the recurrent models (causality, padding, carried
state, exact resume)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqexp.errors import UserError
from seqexp.models.minrnn import MinRNN, MinRNNModel, chunked_scan, log_scan, sequential_scan
from tests import helpers
from tests.helpers import (drop_carried_state, final_state, make_cfg, overfit_lm, overrides_for, resume_run, same_tensors,
                           straight_and_stopped)

pytestmark = pytest.mark.usefixtures("one_thread")

V, C = 23, 2
CELLS = ["gru", "lstm"]


def build(cell: str, head: str, **kw) -> MinRNNModel:
    torch.manual_seed(0)
    kw = {"hidden_size": 16, "num_layers": 2, **kw}
    return MinRNNModel(vocab_size=V, num_outputs=V if head == "lm" else C, head=head, cell=cell, **kw)


def both_scans(rnn: MinRNN, x: torch.Tensor, h0, chunk: int, scan: str = "log"):
    """(parallel, sequential) outputs and their gradients w.r.t. the input, the initial state and
    every weight, for the same random loss; parallel: the `scan` ("chunked" or "log")."""
    w = torch.randn(x.shape[0], x.shape[1], rnn.proj.out_features // (2 if rnn.cell == "gru" else 3))
    results = []
    for parallel in (True, False):
        rnn.zero_grad()
        xi = x.clone().requires_grad_()
        hi = None if h0 is None else h0.clone().requires_grad_()
        pre = rnn.proj(xi)
        if parallel and scan == "log":
            h = log_scan(*rnn.log_coefficients(pre), hi, chunk)
        elif parallel:
            h = chunked_scan(*rnn.coefficients(pre), hi, chunk)
        else:
            h = sequential_scan(*rnn.coefficients(pre), hi)
        (h * w).sum().backward()
        grads = [xi.grad] + ([] if hi is None else [hi.grad]) + [p.grad.clone() for p in rnn.parameters()]
        results.append((h.detach(), grads))
    return results


# ----------------------------------------------------------------------------- parallel == sequential
@pytest.mark.parametrize("initial", ["none", "zero", "carried"])
@pytest.mark.parametrize("T,chunk", [(1, 16), (7, 16), (16, 16), (17, 16), (150, 16), (37, 8), (40, 8)])
@pytest.mark.parametrize("cell", CELLS)
def test_log_scan_equals_the_step_loop(cell, T, chunk, initial):
    """Outputs and gradients, within fp32 tolerance: from no state, an explicit zero state and a
    non-zero state (positive, as every carried minGRU/minLSTM state is), for lengths shorter
    than, equal to, one past and several times the scan's chunk."""
    torch.manual_seed(T)
    rnn = MinRNN(cell, 6, 5)
    x = 2 * torch.randn(3, T, 6)  # gates from near 0 to near 1
    h0 = {"none": None, "zero": torch.zeros(3, 5), "carried": 2 * torch.rand(3, 5)}[initial]
    (par, par_grads), (seq, seq_grads) = both_scans(rnn, x, h0, chunk)
    assert (par > 0).all()  # g() keeps every state positive: what the log-space scan relies on
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-6)
    # logcumsumexp's backward loses more than the loop: against a float64 loop, the scan's gradients
    # are off by ~1e-5 of their largest element with chunks of 16 (~1e-4 with 64; the loop's ~1e-6)
    for a, b in zip(par_grads, seq_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("initial", ["none", "zero", "carried"])
@pytest.mark.parametrize("T,chunk", [(1, None), (2, 1), (7, 16), (16, 16), (17, 16), (33, 8), (64, 32), (97, 32),
                                     (150, 150), (299, None)])
@pytest.mark.parametrize("cell", CELLS)
def test_chunked_scan_equals_the_step_loop(cell, T, chunk, initial):
    """The linear-space scan runs the loop's multiply-adds in another order: outputs and gradients
    agree to fp32 rounding, with full chunks, a short last chunk, one chunk (the loop itself) and
    the default chunk size."""
    torch.manual_seed(T)
    rnn = MinRNN(cell, 6, 5)
    x = 2 * torch.randn(3, T, 6)
    h0 = {"none": None, "zero": torch.zeros(3, 5), "carried": 2 * torch.rand(3, 5)}[initial]
    (par, par_grads), (seq, seq_grads) = both_scans(rnn, x, h0, chunk, "chunked")
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-6)
    for a, b in zip(par_grads, seq_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("chunk", [1, 5, 32, 300])
def test_chunked_scan_gradcheck(chunk):
    """Its hand-written backward (the scan run backward in time) against finite differences, in
    float64, from a state, with coefficients that are views of one tensor (as the model's are)."""
    torch.manual_seed(0)
    ab = torch.rand(2, 23, 8, dtype=torch.double, requires_grad=True)
    h0 = torch.rand(2, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ab, h0: chunked_scan(*ab.chunk(2, -1), h0, chunk), (ab, h0))
    assert torch.autograd.gradcheck(lambda ab: chunked_scan(*ab.chunk(2, -1), None, chunk), (ab,))


def test_chunked_scan_survives_underflowing_decays():
    """Gates near 1 make a ~ 1e-6: a chunk's product of a's underflows to 0, which a formulation
    dividing by it (b / cumprod(a)) turns into inf / NaN; the chunked scan stays finite and exact."""
    torch.manual_seed(0)
    a = torch.rand(2, 200, 4) * 1e-6
    a[:, 100:] = 0.999  # then slow decay: a state that has to survive many chunks
    b = torch.rand(2, 200, 4, requires_grad=True)
    h = chunked_scan(a, b, None, 32)
    exact = sequential_scan(a.double(), b.double(), None)
    torch.testing.assert_close(h.double(), exact, rtol=1e-5, atol=1e-7)
    h.sum().backward()
    assert torch.isfinite(b.grad).all()


def test_no_state_is_the_zero_state():
    rnn = MinRNN("gru", 4, 4)
    x = torch.randn(2, 9, 4)
    torch.testing.assert_close(rnn(x, None), rnn(x, torch.zeros(2, 4)), rtol=0, atol=0)


@pytest.mark.parametrize("scan", ["chunked", "log"])
@pytest.mark.parametrize("cell", CELLS)
def test_long_scan_stays_accurate(cell, scan):
    """2048 steps with strong gates agree with a float64 step loop to 1e-5 relative (chunking
    bounds the log-space scan's error), and so do the chunked scan's gradients."""
    torch.manual_seed(0)
    rnn = MinRNN(cell, 8, 8)
    with torch.no_grad():
        pre = 4 * rnn.proj(torch.randn(2, 2048, 8))
        exact = sequential_scan(*(t.double() for t in rnn.coefficients(pre.double())), None)
    if scan == "log":
        par = log_scan(*rnn.log_coefficients(pre), None)
        assert ((par.double() - exact).abs() / exact).max() < 1e-5
        return
    w = torch.randn(2, 2048, 8)
    grads = []
    for dtype in (torch.float32, torch.float64):
        p = pre.detach().to(dtype).requires_grad_()
        h = chunked_scan(*rnn.coefficients(p), None)
        (h * w.to(dtype)).sum().backward()
        grads.append(p.grad)
        if dtype == torch.float32:
            assert ((h.double() - exact).abs() / exact).max() < 1e-5
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=0, atol=1e-5 * grads[1].abs().max().item())


@pytest.mark.parametrize("scan", ["parallel", "log"])
@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_model_parallel_equals_sequential_for_both_tasks(cell, blocks, scan):
    model = build(cell, "lm", blocks=blocks, scan=scan).eval()
    x = torch.randint(V, (2, 70))
    par, par_state = model(x)
    model.scan = "sequential"
    seq, seq_state = model(x)
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(par_state, seq_state, rtol=1e-5, atol=1e-6)

    model = build(cell, "classify", blocks=blocks, bidirectional=True, scan=scan).eval()
    lengths = torch.tensor([70, 33])
    par, _ = model(x, lengths)
    model.scan = "sequential"
    torch.testing.assert_close(par, model(x, lengths)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- carried state
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("cuts", [(18,), (1, 2, 3), (16, 17), (5, 70, 71, 72)])
def test_chunks_with_carried_state_equal_one_pass(cell, cuts):
    """Consecutive chunks, each starting from the state the previous one returned -- parallel for
    several tokens, the step loop for one (sampling) -- give the logits of one long pass."""
    model = build(cell, "lm").eval()
    x = torch.randint(V, (2, 90))
    whole, whole_state = model(x)
    outs, state = [], None
    for a, b in zip((0, *cuts), (*cuts, 90)):
        out, state = model(x[:, a:b], None, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, whole_state, rtol=1e-5, atol=1e-6)
    fresh, _ = model(x[:, cuts[-1]:])
    assert not torch.allclose(fresh, outs[-1], atol=1e-4)  # the state really matters


@pytest.mark.parametrize("cell", CELLS)
def test_state_has_batch_on_dim_1_like_torch_rnns(cell):
    """(layers, B, H) float32, and the model says so (`state_batch_dim`, where DDP shards and
    gathers it): rows of a batch with their rows of the state compute what the whole batch computes."""
    model = build(cell, "lm", num_layers=3).eval()
    x = torch.randint(V, (4, 12))
    _, state = model(x[:, :6])
    assert state.shape == (3, 4, 16) and state.dtype == torch.float32 and model.state_batch_dim == 1
    whole, _ = model(x[:, 6:], None, state)
    part, _ = model(x[1:3, 6:], None, state.narrow(model.state_batch_dim, 1, 2))
    torch.testing.assert_close(part, whole[1:3], rtol=1e-5, atol=1e-6)


def test_stateful_bptt_carries_the_state_and_truncates_the_gradient():
    """Truncated BPTT as the trainer runs it: the detached state of one chunk starts the next, so
    the second chunk's logits depend on the first chunk's tokens."""
    model = build("gru", "lm")
    assert model.stateful and model.context_size is None
    x = torch.randint(V, (3, 40))
    _, state = model(x[:, :20])
    logits, _ = model(x[:, 20:], None, state.detach())
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 20:].flatten())
    loss.backward()
    other = x.clone()
    other[:, :20] = (other[:, :20] + 1) % V
    _, other_state = model(other[:, :20])
    assert not torch.allclose(model(x[:, 20:], None, other_state)[0], logits, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())


def test_mixed_precision_keeps_the_recurrence_in_fp32():
    """Under bf16 autocast the projections run in bf16, the scan and the carried state in fp32,
    and the logits stay close to the fp32 model's."""
    model = build("gru", "lm").eval()
    x = torch.randint(V, (2, 100))
    ref, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = model(x)
        h = model.layers[0].rnns[0](torch.randn(2, 100, 16))
    assert state.dtype == torch.float32 and h.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# ----------------------------------------------------------------------------- model behaviour
@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_lm_is_causal(cell, blocks):
    """A change at t never reaches the logits before t, inside a scan chunk or across one."""
    model = build(cell, "lm", blocks=blocks).eval()
    x = torch.randint(V, (2, 150))
    base, _ = model(x)
    for t in (0, 15, 16, 100, 149):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out, _ = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_changes_a_logit(cell, blocks, pooling):
    """A sequence's logits are the same alone or right-padded with garbage next to much longer
    neighbours, with both directions."""
    model = build(cell, "classify", blocks=blocks, pooling=pooling, bidirectional=True).eval()
    short = torch.randint(1, V, (1, 5))
    alone, _ = model(short, torch.tensor([5]))
    batch = torch.randint(1, V, (3, 130))  # garbage everywhere past each length
    batch[0, :5] = short[0]
    together, _ = model(batch, torch.tensor([5, 130, 70]))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    single, _ = model(batch[2:, :70], torch.tensor([70]))  # a length across the scan's chunks
    torch.testing.assert_close(together[2], single[0], rtol=1e-5, atol=1e-5)


def test_backward_direction_reads_each_sequence_from_its_own_end():
    """Bare one-layer bidirectional minGRU with last pooling: the head sees the forward states at
    the last token and position 0, and the backward states there, which are exactly a forward
    pass of the backward module over the reversed valid tokens."""
    model = build("gru", "classify", blocks=False, num_layers=1, bidirectional=True).eval()
    x = torch.randint(1, V, (1, 7))
    padded = torch.cat([x, torch.randint(1, V, (1, 5))], 1)  # garbage padding
    fwd, bwd = model.layers[0].rnns
    seen = {}
    model.head.register_forward_hook(lambda m, inp, out: seen.setdefault("v", inp[0]))
    with torch.no_grad():
        model(padded, torch.tensor([7]))
        emb = model.embed(x)
        f, b = fwd(emb), bwd(emb.flip(1)).flip(1)  # (1, 7, H) each, in reading order
    expected = torch.cat([f[:, -1], b[:, -1], f[:, 0], b[:, 0]], -1)
    torch.testing.assert_close(seen["v"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("head", ["lm", "classify"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_reach_every_parameter(cell, head, blocks):
    kw = {"pooling": "attention", "bidirectional": True} if head == "classify" else {"tie_weights": True}
    model = build(cell, head, blocks=blocks, **kw)
    x = torch.randint(V, (4, 80))
    logits, _ = model(x, torch.tensor([80, 65, 5, 2]) if head == "classify" else None)
    target = x if head == "lm" else torch.tensor([0, 1, 1, 0])
    F.cross_entropy(logits.flatten(0, -2) if head == "lm" else logits, target.flatten()).backward()
    for n, p in model.named_parameters():
        if n == "pool.score.bias":  # a softmax ignores a shift: layers.MaskedPooling's bias never learns
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    if head == "lm":
        assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("cell", CELLS)
def test_overfits_one_batch(cell):
    loss = overfit_lm(build(cell, "lm", hidden_size=32), V, steps=150)
    assert loss < 0.05, loss


def test_config_refuses_a_bidirectional_language_model():
    node = make_cfg("model=mingru", "model.bidirectional=true").model
    with pytest.raises(UserError, match="bidirectional"):
        MinRNNModel.check_config(node, "lm")
    MinRNNModel.check_config(node, "classify")


# ----------------------------------------------------------------------------- through train()
@pytest.mark.parametrize("kind", ["char", "imdb"])
def test_resume_is_exact_and_needs_the_carried_state(kind, request, tmp_path, monkeypatch):
    """N steps + SIGINT + resume = 2N steps, bitwise (tests/helpers.py's protocol, as tests/test_resume.py), for a
    stateful language model and a bidirectional classifier; resumed without the carried state,
    the language model's run differs."""
    tiny = ["model=mingru", "model.hidden_size=16", "model.num_layers=2"]
    if kind == "imdb":
        tiny += ["model.bidirectional=true", "model.pooling=mean"]
    monkeypatch.setitem(helpers.TINY, "mingru", tiny)
    overrides = overrides_for(kind, "mingru", request)
    straight, partial = straight_and_stopped(overrides, tmp_path)
    if kind == "imdb":  # a classifier carries no state between batches
        return
    with monkeypatch.context() as m:
        drop_carried_state(m)
        resume_run(overrides, partial)
    assert not same_tensors(final_state(straight), final_state(partial)), "dropping the carried state changed nothing"
