"""The private torch APIs seqexp relies on, each where seqexp uses it, so that a torch upgrade
that changes one fails here, by name, before it silently changes training:
- guard.py: `Optimizer._step_supports_amp_scaling` marks the fused kernels, which skip an update
  when `optimizer.found_inf` is 1 (weights, moments and step count untouched); `torch._foreach_norm`
  with a dtype; `torch._foreach_mul_` with a 0-dim tensor;
- ema.py: `torch._foreach_lerp_`, `_foreach_sub`, `_foreach_mul_`, `_foreach_add_`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seqexp.guard import all_finite, poison_unless, skips_on_device, step_unless

FUSED = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad,
         "sgd": lambda p, **kw: torch.optim.SGD(p, momentum=0.9, **kw)}


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_optimizers_say_so_and_skip_an_update_on_found_inf(name):
    p = params()
    opt = FUSED[name](p, lr=0.1, fused=True)
    assert skips_on_device(opt)
    assert not skips_on_device(FUSED[name](params(), lr=0.1))  # the default kernels do not
    assert not skips_on_device(torch.optim.RMSprop(params(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for ok in (True, False, True):  # the first step creates the state
        for q in p:
            q.grad = torch.ones_like(q)
        before = [q.detach().clone() for q in p], copy.deepcopy(opt.state_dict())
        step_unless(scaler, opt, torch.tensor(ok))
        changed = [not torch.equal(q, b) for q, b in zip(p, before[0])]
        if ok:
            assert all(changed), name
        else:
            assert not any(changed), name  # skipped: weights, moments and step count as they were
            after = opt.state_dict()["state"]
            for i, state in before[1]["state"].items():
                for k, v in state.items():
                    assert torch.equal(after[i][k], v), (name, k)
        assert not hasattr(opt, "found_inf")  # the flag is never left behind


def test_foreach_norm_and_mul_as_the_guard_uses_them():
    t = [torch.ones(3), torch.full((2, 2), 2.0)]
    assert bool(all_finite(t, torch.float64)) and bool(all_finite(t, torch.float32))
    assert not bool(all_finite([torch.ones(3), torch.tensor([1.0, math.inf])], torch.float64))
    assert not bool(all_finite([torch.tensor([math.nan])], torch.float64))
    poison_unless(t, torch.tensor(True))
    assert torch.equal(t[0], torch.ones(3))
    poison_unless(t, torch.tensor(False))
    assert t[0].isnan().all() and t[1].isnan().all()


def test_foreach_ops_the_weight_average_uses():
    from seqexp.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    start = [a.clone() for a in ema.average]
    ema.update()  # _foreach_lerp_ with a float weight
    weight = 1.0 - min(0.5, 2 / 11)
    for a, s, p in zip(ema.average, start, model.parameters()):
        torch.testing.assert_close(a, s + weight * (p - s), rtol=0, atol=1e-6)
    before = [a.clone() for a in ema.average]
    ema.update(torch.tensor(False))  # _foreach_sub, _foreach_mul_ by a device tensor, _foreach_add_
    assert all(torch.equal(a, b) for a, b in zip(ema.average, before))
