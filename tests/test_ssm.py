"""Mamba (models/mamba.py) and Gated DeltaNet (models/deltanet.py): the parallel forms compute what
a float64 loop written here from the papers' equations computes, outputs and gradients, from a zero
and a carried state, across chunk edges and over thousands of steps; the switches do what they say;
and both families train, resume exactly, sample, and run on every kind of data.

(Causality, padding invariance and a gradient for every parameter at the YAML's own sizes:
tests/test_model_contract.py, which discovers the two YAML files.)
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from seqexp.commands import sample
from seqexp.errors import UserError
from seqexp.inference import load_run, text_encoder
from seqexp.models.deltanet import CHUNK, DeltaNetModel, chunked_delta_rule, sequential_delta_rule
from seqexp.models.mamba import SCAN_CHUNK, SSD_CHUNK, MambaModel, selective_scan, sequential_scan, ssd_scan
from seqexp.sampling import generate
from seqexp.train import train
from tests import helpers
from tests.helpers import (drop_carried_state, final_state, imdb_overrides, make_cfg, overfit_lm, overrides_for, resume_run,
                           same_tensors, straight_and_stopped, tiny_overrides)

pytestmark = pytest.mark.usefixtures("one_thread")

V, C = 23, 2
FAMILIES = ["mamba", "deltanet"]
# each family and its control: Δ, B, C constant (selective=false); α ≡ 1 (gate=false); Mamba with one
# Δ and decay per head of 8 channels (head_dim, ssd_scan), selective and not
VARIANTS = {"mamba": {}, "mamba_lti": {"selective": False}, "mamba_heads": {"head_dim": 8},
            "mamba_heads_lti": {"selective": False, "head_dim": 8}, "deltanet": {}, "deltanet_plain": {"gate": False}}
TINY = {"mamba": ["model=mamba", "model.d_model=16", "model.d_state=4"],
        "deltanet": ["model=deltanet", "model.d_model=16", "model.num_heads=2", "model.mlp_ratio=2"]}


# the memory lab's tasks, tiny (as tests/test_lab.py runs them)
KINDS = ["copy", "selective_copy", "recall", "adding"]
SMALL = ["data.size=64", "data.eval_size=32", "data.batch_size=8"]
QUICK = ["trainer.progress=false", "trainer.device=cpu", "logging.tensorboard=false"]


@pytest.fixture(autouse=True)
def tiny_families(monkeypatch):
    """helpers.TINY's entries for the two families, so that the shared run helpers can build them."""
    for name, overrides in TINY.items():
        monkeypatch.setitem(helpers.TINY, name, overrides)


def build(variant: str, task: str, **kw):
    torch.manual_seed(0)
    kw = {"vocab_size": V, "num_outputs": V if task == "lm" else C, "head": task, "d_model": 16, "num_layers": 2,
          **VARIANTS[variant], **kw}
    if variant.startswith("mamba"):
        return MambaModel(**{"d_state": 4, **kw})
    return DeltaNetModel(**{"num_heads": 2, "mlp_ratio": 2, **kw})


def close_to(x: torch.Tensor, exact: torch.Tensor, rel: float) -> None:
    """|x - exact| <= rel * max |exact|, elementwise: a bound on the error relative to the tensor's scale."""
    err = (x.double() - exact).abs().max().item()
    assert err <= rel * exact.abs().max().item(), f"error {err:.3g} at scale {exact.abs().max().item():.3g}"


def outputs_and_grads(fn, inputs: list, w: list) -> tuple[list, list]:
    """fn(*inputs) -> (y, state); the outputs and the gradient of sum(w * outputs) w.r.t. every input."""
    inputs = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    sum((o * wi.to(o.dtype)).sum() for o, wi in zip(outs, w)).backward()
    return [o.detach() for o in outs], [x.grad for x in inputs if x is not None]


# ----------------------------------------------------------------------------- Mamba's scan
def mamba_reference(dt, u, A, Bm, Cm, h0):
    """The paper's selective SSM, float64, one step at a time: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    (zero-order hold for A, Euler for B), y_t = C_t h_t. Shapes as mamba.sequential_scan."""
    B, T, E = u.shape
    h = torch.zeros(B, *A.shape, dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(T):
        Abar = torch.exp(dt[:, t, :, None].double() * A.double())  # (B, E, N)
        Bbar_u = dt[:, t, :, None].double() * Bm[:, t, None, :].double() * u[:, t, :, None].double()
        h = Abar * h + Bbar_u
        ys.append(torch.einsum("ben,bn->be", h, Cm[:, t].double()))
    return torch.stack(ys, dim=1), h


def mamba_inputs(B: int, T: int, E: int, N: int, initial: str, dt_scale: float = 1.0):
    g = torch.Generator().manual_seed(T)
    dt = dt_scale * torch.rand(B, T, E, generator=g)  # decays exp(Δ A) from ~1 to ~e^-8 per step
    u, Bm, Cm = torch.randn(B, T, E, generator=g), torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    A = -torch.arange(1.0, N + 1).repeat(E, 1) * (0.5 + torch.rand(E, N, generator=g))  # S4D-real, perturbed
    h0 = {"none": None, "carried": torch.randn(B, E, N, generator=g)}[initial]
    return [dt, u, A, Bm, Cm, h0]


@pytest.mark.parametrize("initial", ["none", "carried"])
@pytest.mark.parametrize("T", [1, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 1, 3 * SCAN_CHUNK + 5])
@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_mamba_scan_equals_the_float64_loop(scan, T, initial):
    """Outputs, final state and the gradients of all six inputs (h_T's gradient included), in float32,
    against the paper's recurrence in float64: lengths shorter than, equal to, one past and several
    times the chunk, from no state and from a carried one."""
    inputs = mamba_inputs(2, T, 6, 4, initial)
    w = [torch.randn(2, T, 6), torch.randn(2, 6, 4)]
    fn = selective_scan if scan == "chunked" else sequential_scan
    outs, grads = outputs_and_grads(fn, inputs, w)
    exact_outs, exact_grads = outputs_and_grads(mamba_reference, [None if x is None else x.double() for x in inputs], w)
    for o, e in zip(outs, exact_outs):
        close_to(o, e, 1e-6)
    for g, e in zip(grads, exact_grads):
        close_to(g, e, 1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 8, 40])
def test_mamba_scan_gradcheck(chunk):
    """The hand-written backward against finite differences, float64: from a state, with several
    chunk sizes (40 > T: one chunk), and with Δ, B, C expanded from constants (stride 0), as the
    selective=false mixer passes them."""
    dt, u, A, Bm, Cm, h0 = (x.double().requires_grad_() for x in mamba_inputs(2, 19, 3, 2, "carried"))
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk=chunk), (dt, u, A, Bm, Cm, h0))
    dt_c, B_c, C_c = (torch.rand(n, dtype=torch.float64, requires_grad=True) for n in (3, 2, 2))
    assert torch.autograd.gradcheck(
        lambda dt_c, B_c, C_c, u: selective_scan(dt_c.expand(2, 19, 3), u, A.detach(), B_c.expand(2, 19, 2),
                                                 C_c.expand(2, 19, 2), None, chunk),
        (dt_c, B_c, C_c, u))


def test_mamba_scan_stays_accurate_over_thousands_of_steps():
    """3000 steps with memories from a few steps to thousands (Δ A down to -1e-3): float32 outputs,
    state and gradients within 1e-5 of the float64 loop's scale."""
    T = 3000
    dt, u, A, Bm, Cm, _ = mamba_inputs(1, T, 4, 4, "none")
    dt = dt * torch.logspace(-3, 0, 4)  # one channel per decade of Δ
    w = [torch.randn(1, T, 4), torch.randn(1, 4, 4)]
    outs, grads = outputs_and_grads(selective_scan, [dt, u, A, Bm, Cm, None], w)
    exact_outs, exact_grads = outputs_and_grads(mamba_reference, [x.double() for x in (dt, u, A, Bm, Cm)] + [None], w)
    for o, e in zip(outs, exact_outs):
        close_to(o, e, 1e-5)
    for g, e in zip(grads, exact_grads):
        close_to(g, e, 1e-5)


def per_channel(scan, P: int):
    """A scan over per-head Δ (B, T, H) and A (H,) as one over per-channel Δ (B, T, E) and A (E, N):
    each head's values repeated over its P channels (and A over the N states), inside autograd."""
    def run(dt, u, A, Bm, Cm, h0):
        A = A.repeat_interleave(P)[:, None].expand(-1, Bm.shape[-1])  # (E, N)
        return scan(dt.repeat_interleave(P, -1), u, A, Bm, Cm, h0)
    return run


def ssd_inputs(B: int, T: int, H: int, P: int, N: int, initial: str):
    g = torch.Generator().manual_seed(T)
    dt = torch.rand(B, T, H, generator=g)
    u = torch.randn(B, T, H * P, generator=g)
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    A = -torch.empty(H).uniform_(1, 16, generator=g)  # Mamba-2's range: decays from e^-16 to ~1 per step
    h0 = {"none": None, "carried": torch.randn(B, H * P, N, generator=g)}[initial]
    return [dt, u, A, Bm, Cm, h0]


@pytest.mark.parametrize("initial", ["none", "carried"])
@pytest.mark.parametrize("T", [1, SSD_CHUNK - 1, SSD_CHUNK, SSD_CHUNK + 1, 3 * SSD_CHUNK + 5])
def test_ssd_scan_equals_the_float64_loop(T, initial):
    """head_dim's scan (one Δ and one decay per head, Mamba-2's SSD form): outputs, final state and
    the gradients of all six inputs against the paper's per-channel recurrence in float64, each
    head's Δ and A repeated over its channels; lengths around and across the chunk, padded inside."""
    inputs = ssd_inputs(2, T, 3, 2, 4, initial)
    w = [torch.randn(2, T, 6), torch.randn(2, 6, 4)]
    outs, grads = outputs_and_grads(ssd_scan, inputs, w)
    exact_outs, exact_grads = outputs_and_grads(per_channel(mamba_reference, 2),
                                                [None if x is None else x.double() for x in inputs], w)
    for o, e in zip(outs, exact_outs):
        close_to(o, e, 1e-6)
    for g, e in zip(grads, exact_grads):
        close_to(g, e, 1e-5)


def test_ssd_scan_stays_accurate_over_thousands_of_steps():
    """3000 steps, one head per decade of Δ A (-1e-3 to -1 per step): float32 within 1e-5 of the
    float64 loop's scale, outputs, state and gradients, where a decay spans many chunks."""
    T = 3000
    dt, u, A, Bm, Cm, _ = ssd_inputs(1, T, 4, 2, 4, "none")
    dt, A = dt * torch.logspace(-3, 0, 4), -torch.ones(4)
    w = [torch.randn(1, T, 8), torch.randn(1, 8, 4)]
    outs, grads = outputs_and_grads(ssd_scan, [dt, u, A, Bm, Cm, None], w)
    exact_outs, exact_grads = outputs_and_grads(per_channel(mamba_reference, 2),
                                                [x.double() for x in (dt, u, A, Bm, Cm)] + [None], w)
    for o, e in zip(outs, exact_outs):
        close_to(o, e, 1e-5)
    for g, e in zip(grads, exact_grads):
        close_to(g, e, 1e-5)


# ----------------------------------------------------------------------------- the delta rule
def delta_reference(q, k, v, log_alpha, beta, S0):
    """Gated DeltaNet's recurrence as the paper writes it, float64, with S (d_v, d_k):
    S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t. Takes and returns the
    state as the module keeps it, Sᵀ (d_k, d_v)."""
    q, k, v, log_alpha, beta = (x.double() for x in (q, k, v, log_alpha, beta))
    B, H, T, K = k.shape
    S = torch.zeros(B, H, v.shape[-1], K, dtype=torch.float64) if S0 is None else S0.double().mT
    eye = torch.eye(K, dtype=torch.float64)
    outs = []
    for t in range(T):
        k_t, a_t, b_t = k[:, :, t, :, None], log_alpha[:, :, t, None, None].exp(), beta[:, :, t, None, None]
        S = a_t * S @ (eye - b_t * k_t @ k_t.mT) + b_t * v[:, :, t, :, None] @ k_t.mT
        outs.append((S @ q[:, :, t, :, None]).squeeze(-1))
    return torch.stack(outs, dim=2), S.mT


def delta_inputs(B: int, H: int, T: int, K: int, initial: str, decay: float = 1.0):
    g = torch.Generator().manual_seed(T)
    q = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1) / math.sqrt(K)
    k = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    v = torch.randn(B, H, T, K, generator=g)
    log_alpha, beta = -decay * torch.rand(B, H, T, generator=g), torch.rand(B, H, T, generator=g)
    S0 = {"none": None, "carried": torch.randn(B, H, K, K, generator=g)}[initial]
    return [q, k, v, log_alpha, beta, S0]


@pytest.mark.parametrize("initial", ["none", "carried"])
@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("rule", ["chunked", "sequential"])
def test_delta_rule_equals_the_float64_loop(rule, T, initial):
    """Outputs, final state and the gradients of q, k, v, log α, β and S_0, in float32, against the
    paper's recurrence in float64, across chunk edges, from no state and from a carried one."""
    inputs = delta_inputs(2, 2, T, 8, initial)
    w = [torch.randn(2, 2, T, 8), torch.randn(2, 2, 8, 8)]
    fn = chunked_delta_rule if rule == "chunked" else sequential_delta_rule
    outs, grads = outputs_and_grads(fn, inputs, w)
    exact_outs, exact_grads = outputs_and_grads(delta_reference, inputs, w)
    for o, e in zip(outs, exact_outs):
        close_to(o, e, 1e-6)
    for g, e in zip(grads, exact_grads):
        close_to(g, e, 1e-5)


def test_delta_rule_gradcheck():
    """Autograd through the chunked form (triangular solve, masked decays), float64, from a state,
    with a short last chunk."""
    inputs = [x.double().requires_grad_() for x in delta_inputs(1, 2, 11, 3, "carried")]
    assert torch.autograd.gradcheck(lambda *a: chunked_delta_rule(*a, chunk=4), inputs)


def test_delta_rule_stays_exact_when_decays_underflow():
    """log α = -60 per step: γ_t = α_1...α_t underflows to 0 within a chunk, and γ_t / γ_s with s > t
    would overflow; the chunked form masks before exp, so outputs and gradients stay finite and
    equal the loop's."""
    inputs = delta_inputs(1, 2, 40, 4, "carried", decay=60.0)
    w = [torch.randn(1, 2, 40, 4), torch.randn(1, 2, 4, 4)]
    outs, grads = outputs_and_grads(chunked_delta_rule, inputs, w)
    exact_outs, exact_grads = outputs_and_grads(delta_reference, inputs, w)
    for x, e in zip(outs + grads, exact_outs + exact_grads):
        assert torch.isfinite(x).all()
        close_to(x, e, 1e-5)


def test_delta_rule_stays_accurate_over_thousands_of_steps():
    """3000 steps with α close to 1 (memories of hundreds to thousands of steps): float32 outputs,
    state and gradients within 1e-5 of the float64 loop's scale."""
    inputs = delta_inputs(1, 2, 3000, 8, "none", decay=0.01)
    w = [torch.randn(1, 2, 3000, 8), torch.randn(1, 2, 8, 8)]
    outs, grads = outputs_and_grads(chunked_delta_rule, inputs, w)
    exact_outs, exact_grads = outputs_and_grads(delta_reference, inputs, w)
    for x, e in zip(outs + grads, exact_outs + exact_grads):
        close_to(x, e, 1e-5)


# ----------------------------------------------------------------------------- the switches
def test_selective_false_makes_delta_b_c_constants():
    """Δ, B, C of the selective mixer change with its input; with selective=false they are the same
    for any input (and no projection computes them)."""
    u1, u2 = torch.randn(2, 2, 9, 32).unbind(0)  # E = 2 x d_model
    selective, lti = build("mamba", "lm").layers[0].mixers[0], build("mamba_lti", "lm").layers[0].mixers[0]
    for a, b in zip(selective.ssm_params(u1), selective.ssm_params(u2)):
        assert not torch.allclose(a, b)
    for a, b in zip(lti.ssm_params(u1), lti.ssm_params(u2)):
        assert torch.equal(a, b) and torch.equal(a, a[:1, :1].expand_as(a))  # one value per channel/state
    assert not hasattr(lti, "x_proj") and not hasattr(lti, "dt_proj")


def test_gate_false_is_alpha_one():
    """gate=false: log α is exactly 0 for any input (and the decay's parameters do not exist);
    with the gate, α < 1 and depends on the input."""
    x1, x2 = torch.randn(2, 2, 9, 16).unbind(0)
    gated, plain = build("deltanet", "lm").layers[0].mixers[0], build("deltanet_plain", "lm").layers[0].mixers[0]
    la1, la2 = gated.coefficients(x1, None)[3], gated.coefficients(x2, None)[3]
    assert (la1 < 0).all() and not torch.allclose(la1, la2)
    for x in (x1, x2):
        assert torch.equal(plain.coefficients(x, None)[3], torch.zeros(2, 2, 9))
    assert not any(hasattr(plain, n) for n in ("a_proj", "A_log", "dt_bias"))


# ----------------------------------------------------------------------------- the models
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunks_with_carried_state_equal_one_pass(variant):
    """Consecutive chunks, each from the state the previous returned -- the parallel form for
    several tokens, the step loop for one (sampling) -- give one long pass's logits and state,
    with chunks that cut across the scans' own chunks."""
    model = build(variant, "lm").eval()
    x = torch.randint(V, (2, 45))
    with torch.no_grad():
        full, full_state = model(x)
        for cuts in [(1, 2, 3), (7, 8, 9, 40), tuple(range(1, 45))]:  # the last: one token at a time
            state, outs = None, []
            for a, b in zip((0, *cuts), (*cuts, 45)):
                logits, state = model(x[:, a:b], None, state)
                outs.append(logits)
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
            for s, f in zip(state, full_state):
                assert s.dtype == torch.float32
                torch.testing.assert_close(s, f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_of_one_pass_equal_the_step_loops(variant):
    """The training loss's gradient for every parameter: one parallel pass against 20 single-token
    steps carrying the state through autograd."""
    model = build(variant, "lm")
    x = torch.randint(V, (2, 21))
    grads = []
    for stepped in (False, True):
        model.zero_grad()
        if stepped:
            state, outs = None, []
            for t in range(20):
                logits, state = model(x[:, t:t + 1], None, state)
                outs.append(logits)
            logits = torch.cat(outs, 1)
        else:
            logits, _ = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for (n, _), a, b in zip(model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("pooling", ["last", "mean", "attention"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bidirectional_classifier_ignores_padding_and_trains_both_directions(variant, pooling):
    """A sequence's logits are the same alone or right-padded with garbage beside longer rows (the
    backward mixer reads each row reversed within its length), and every parameter, both
    directions', gets a gradient."""
    model = build(variant, "classify", bidirectional=True, pooling=pooling).eval()
    short = torch.randint(1, V, (1, 5))
    alone, _ = model(short, torch.tensor([5]))
    batch = torch.randint(1, V, (3, 50))
    batch[0, :5] = short[0]
    together, _ = model(batch, torch.tensor([5, 50, 37]))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2], model(batch[2:, :37], torch.tensor([37]))[0][0], rtol=1e-5, atol=1e-5)
    F.cross_entropy(model.train()(batch, torch.tensor([5, 50, 37]))[0], torch.tensor([0, 1, 1])).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead in ([], ["pool.score.bias"]), dead  # a softmax ignores a shift: the score's bias never learns


@pytest.mark.parametrize("family", FAMILIES)
def test_recurrence_and_state_stay_float32_under_autocast(family):
    """bf16 autocast runs the projections in bf16 but the recurrence, and so the carried state, in
    float32; the logits of a chunk from a carried state stay near float32's."""
    model = build(family, "lm").eval()
    x = torch.randint(V, (2, 40))
    with torch.no_grad():
        ref, ref_state = model(x[:, 20:], None, model(x[:, :20])[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, state = model(x[:, :20])
            logits, _ = model(x[:, 20:], None, state)
    assert all(s.dtype == torch.float32 for s in state)
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_carries_state_like_rereading_the_prefix(family):
    model = build(family, "lm")
    prompt = torch.randint(V, (2, 5))
    out = torch.stack(list(generate(model, prompt, 10, greedy=True)), 1)  # (2, 10): prompt once, then T = 1
    seq = prompt
    for t in range(10):  # the slow way: the whole prefix, in parallel, each time
        with torch.no_grad():
            nxt = model(seq)[0][:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, t])
        seq = torch.cat([seq, nxt[:, None]], 1)


@pytest.mark.parametrize("variant", ["mamba", "mamba_heads", "deltanet"])
def test_overfits_one_batch(variant):
    loss = overfit_lm(build(variant, "lm", d_model=32), V, steps=150)
    assert loss < 0.05, loss


@pytest.mark.parametrize("family", FAMILIES)
def test_config_checks(family):
    node = make_cfg(f"model={family}", "model.bidirectional=true").model
    cls = type(build(family, "lm"))
    with pytest.raises(UserError, match="bidirectional"):
        cls.check_config(node, "lm")
    cls.check_config(node, "classify")
    bad = "model.dt_rank=0" if family == "mamba" else "model.num_heads=3"
    with pytest.raises(UserError, match="dt_rank" if family == "mamba" else "multiple of model.num_heads"):
        cls.check_config(make_cfg(f"model={family}", bad).model, "lm")
    if family == "mamba":  # the heads must split the inner width (2 x 256)
        with pytest.raises(UserError, match="model.head_dim must be null or divide .* 512, got 48"):
            cls.check_config(make_cfg("model=mamba", "model.head_dim=48").model, "lm")
        cls.check_config(make_cfg("model=mamba", "model.head_dim=64").model, "lm")


# ----------------------------------------------------------------------------- through train()
@pytest.mark.parametrize("family", FAMILIES)
def test_char_resume_is_bitwise_and_needs_the_carried_state(family, request, tmp_path, monkeypatch):
    """N steps + SIGINT + resume = 2N steps, bitwise (tests/test_resume.py's protocol), on a char
    stream with truncated BPTT; resumed without the carried state, the run differs."""
    overrides = overrides_for("char", family, request)
    straight, partial = straight_and_stopped(overrides, tmp_path)
    with monkeypatch.context() as m:
        drop_carried_state(m)
        resume_run(overrides, partial)
    assert not same_tensors(final_state(straight), final_state(partial)), "dropping the carried state changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_from_a_tiny_char_run(family, tiny_text, tmp_path):
    """seqexp-sample (scripts/sample.py) on a checkpoint: its entry point runs, and the text it
    streams is the prompt, then the characters `generate` gives for the seed."""
    run = tmp_path / "run"
    train(make_cfg(*tiny_overrides(family, tiny_text, "trainer.max_steps=6", "trainer.eval_every=6")), run)
    sample.main([str(run), "prompt=the ", "length=5", "seed=3"])  # argument parsing, printing
    out = io.StringIO()
    [text] = sample.sample(str(run), sample.Options(prompt="the ", length=25, seed=3), out)
    assert out.getvalue() == text + "\n" and len(text) == 4 + 25
    loaded = load_run(run)
    enc = text_encoder(loaded.ckpt)
    ids = [int(t) for t in generate(loaded.model, enc.encode("the ")[None], 25, temperature=0.8, top_k=40,
                                    generator=torch.Generator().manual_seed(3))]
    assert text == "the " + enc.decode(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_bidirectional_imdb_run(family, imdb_archive, tmp_path):
    metrics = train(make_cfg(*imdb_overrides(family, imdb_archive, tmp_path / "cache", "model.bidirectional=true",
                                             "model.pooling=mean", "trainer.max_steps=4", "trainer.eval_every=4")),
                    tmp_path / "run")
    assert math.isfinite(metrics["final"]["val/loss"]) and 0 <= metrics["final"]["val/acc"] <= 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_run_on_every_lab_task(family, kind, tmp_path):
    short = ["data.num_pairs=4"] if kind == "recall" else []  # its default 8 pairs and 8 queries need 24 positions
    metrics = train(make_cfg(f"data={kind}", "data.length=16", *short, *SMALL, *TINY[family], "trainer.max_steps=4",
                             "trainer.eval_every=4", "scheduler.warmup_steps=1", *QUICK), tmp_path / "run")
    assert math.isfinite(metrics["final"]["val/loss"])


def test_the_decay_rates_of_the_state_space_get_no_weight_decay():
    """A_log holds decay rates, not weights: AdamW's decay would pull them to 0 and lengthen every
    memory. The model marks it (`no_weight_decay`); build_optimizer honours the mark."""
    from seqexp.build import build_optimizer

    model = build("mamba", "lm")
    opt = build_optimizer(make_cfg("model=mamba", "optimizer=adamw").optimizer, model)
    decayed, free = ({id(p) for p in g["params"]} for g in opt.param_groups)
    a_logs = [p for n, p in model.named_parameters() if n.endswith("A_log")]
    assert a_logs and all(id(p) in free for p in a_logs)
    assert any(p.dim() >= 2 and id(p) in decayed for p in model.parameters())  # the matrices still decay
