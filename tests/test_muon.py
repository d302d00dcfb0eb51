"""optimizer=muon (seqexp/muon.py): Muon takes the hidden weight matrices -- by module type, the
same rule for every family -- and AdamW the rest, in one optimizer that schedules, saves and
loads as one. Exact resume through the trainer: tests/test_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from seqexp.build import build_optimizer, hidden_matrices, instantiate
from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.models.attention import AttentionModel
from seqexp.models.recurrent import RecurrentModel
from seqexp.muon import MuonAdamW
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 19, 10


def attention(**kw) -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel(vocab_size=V, num_outputs=V, head="lm", max_len=T, d_model=16, n_heads=2, n_layers=2, **kw)


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_embedding_head_gains_and_biases(tie):
    model = attention(conv_kernel=3, qk_norm=True, tie_weights=tie)
    hidden = names(model, hidden_matrices(model))
    assert hidden == {f"blocks.{i}.{m}.weight" for i in range(2)
                      for m in ("conv.pw", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    opt = build_optimizer(make_cfg("model=attention", "optimizer=muon").optimizer, model)
    assert names(model, [p for g in opt.muon.param_groups for p in g["params"]]) == hidden
    rest = names(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    assert rest == {n for n, _ in model.named_parameters()} - hidden  # the embedding, head, norms, biases, dw
    assert ("head.weight" in rest) == (not tie)  # tied: the embedding, listed once


def test_a_recurrent_layers_stacked_gate_matrices_are_hidden_matrices():
    torch.manual_seed(0)
    model = RecurrentModel(vocab_size=V, num_outputs=V, head="lm", cell="gru", embed_dim=8, hidden_size=16,
                           num_layers=2, tie_weights=False)
    assert names(model, hidden_matrices(model)) == {f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)}


def test_a_model_without_hidden_matrices_is_refused_in_one_line():
    class Bag(torch.nn.Module):  # an embedding and a head, nothing between (a bag of n-grams)
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.EmbeddingBag(V, 8), torch.nn.Linear(8, 2)

        def input_embedding(self):
            return self.embed

    with pytest.raises(UserError, match="optimizer=muon: this model has no hidden weight matrices") as e:
        build_optimizer(make_cfg("model=attention", "optimizer=muon").optimizer, Bag())
    assert "\n" not in str(e.value)


def test_a_schedule_scales_both_learning_rates_and_their_ratio_stays():
    model = attention()
    cfg = make_cfg("model=attention", "optimizer=muon", "optimizer.lr=1e-3", "optimizer.muon_lr=4e-3")
    opt = build_optimizer(cfg.optimizer, model)
    schedule = instantiate(cfg.scheduler, optimizer=opt, total_steps=50)
    seen = []
    for _ in range(30):  # through the warm-up and into the cosine
        muon, adamw = {g["lr"] for g in opt.muon.param_groups}, {g["lr"] for g in opt.adamw.param_groups}
        assert len(muon) == len(adamw) == 1 and muon.pop() == pytest.approx(4 * adamw.pop())
        seen.append(opt.adamw.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert len(set(seen)) > 20  # the schedule did move them


def train(model, opt, x, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[0].flatten(0, 1), x.flatten()).backward()
        opt.step()


def test_the_state_dict_is_one_optimizers_and_loading_it_continues_exactly():
    cfg = make_cfg("model=attention", "optimizer=muon").optimizer
    x = torch.randint(V, (4, T))
    straight = attention()
    train(straight, build_optimizer(cfg, straight), x, 5)

    first = attention()
    train(first, opt1 := build_optimizer(cfg, first), x, 2)
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict()))
    n = sum(len(g["params"]) for g in saved[1]["param_groups"])
    assert sorted(saved[1]["state"]) == list(range(n))  # torch's format: every parameter once, numbered
    assert any("momentum_buffer" in s for s in saved[1]["state"].values())  # Muon's
    assert any("exp_avg_sq" in s for s in saved[1]["state"].values())  # AdamW's
    again = attention()
    again.load_state_dict(saved[0])
    opt2 = build_optimizer(cfg, again)
    opt2.load_state_dict(copy.deepcopy(saved[1]))
    train(again, opt2, x, 3)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), again.state_dict().values()))

    fresh = attention()  # without Muon's momentum the run is another
    fresh.load_state_dict(saved[0])
    opt3 = build_optimizer(cfg, fresh)
    partial = copy.deepcopy(saved[1])
    for s in partial["state"].values():
        s.pop("momentum_buffer", None)
    opt3.load_state_dict(partial)
    train(fresh, opt3, x, 3)
    assert not all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), fresh.state_dict().values()))


def test_an_invalid_muon_learning_rate_fails_before_work_naming_the_key():
    with pytest.raises(UserError, match=r"optimizer\.muon_lr"):
        validate(make_cfg("model=attention", "optimizer=muon", "optimizer.muon_lr=0"))
    validate(make_cfg("model=attention", "optimizer=muon"))  # null: optimizer.lr, accepted


def test_muon_is_a_torch_optimizer_as_the_trainer_expects():
    model = attention()
    opt = build_optimizer(make_cfg("model=attention", "optimizer=muon").optimizer, model)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, MuonAdamW)
    assert not opt.state  # no step yet
    train(model, opt, torch.randint(V, (2, T)), 1)
    assert opt.state and all(p in opt.state for g in opt.param_groups for p in g["params"])
