"""The weight average (ema.py): its update, its state round trip, and the swap for evaluation."""

from __future__ import annotations

import pytest
import torch

from seqexp.ema import EMA


def tied_model() -> torch.nn.Module:
    """Embedding and output layer share one weight, as the attention model's do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 5, bias=False))
    model[2].weight = model[0].weight
    return model


def train_step(model: torch.nn.Module) -> None:
    """Move every weight, as an optimizer step would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def averaged(steps: int, decay: float = 0.9) -> tuple[torch.nn.Module, EMA]:
    model = tied_model()
    ema = EMA(model, decay)
    for _ in range(steps):
        train_step(model)
        ema.update()
    return model, ema


def test_update_follows_the_ramped_decay():
    model = tied_model()
    ema = EMA(model, decay=0.9)
    start = [a.clone() for a in ema.average]  # the initial weights, each trained tensor once
    assert len(start) == 3
    train_step(model)
    ema.update()
    d = min(0.9, 2 / 11)  # (1 + n) / (10 + n) at n = 1
    for a, s, p in zip(ema.average, start, ema.params):
        assert torch.allclose(a, d * s + (1 - d) * p)


def test_state_dict_round_trip_continues_identically():
    model, ema = averaged(3)
    again = EMA(model, 0.9)  # a fresh average: from the current weights
    again.load_state_dict(ema.state_dict())
    assert again.updates == 3 and all(torch.equal(a, b) for a, b in zip(again.average, ema.average))
    # a checkpoint's averaged "model" (a whole state_dict, both names of the tied weight) loads too
    from_file = EMA(model, 0.9)
    from_file.load_state_dict({"updates": 3, "average": ema.averaged_state()})
    train_step(model)
    for e in (ema, again, from_file):
        e.update()
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ema.average, again.average, from_file.average))


def test_averaged_state_reaches_both_names_of_a_tied_weight():
    model, ema = averaged(2)
    state = ema.averaged_state()
    assert state.keys() == model.state_dict().keys()
    assert torch.equal(state["0.weight"], ema.average[0]) and torch.equal(state["2.weight"], ema.average[0])
    assert not torch.equal(state["0.weight"], model[0].weight)  # the average, not the trained weight


def test_swap_context_holds_the_average_and_restores_the_trained_weights_exactly():
    model, ema = averaged(4)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        for p, a in zip(ema.params, ema.average):
            assert torch.equal(p, a)
        assert torch.equal(model[2].weight, ema.average[0])  # still tied
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped():
            raise RuntimeError("inside")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert model[2].weight is model[0].weight


def test_the_multi_tensor_update_equals_the_per_tensor_loop_bit_for_bit():
    model, ema = averaged(0, decay=0.99)
    loop = [a.clone() for a in ema.average]
    for n in range(1, 30):  # through the ramp (decay above and below 1/2)
        train_step(model)
        ema.update()
        for a, p in zip(loop, ema.params):  # the update as it was: one lerp per tensor
            a.lerp_(p, 1.0 - min(0.99, (1 + n) / (10 + n)))
    assert all(torch.equal(a, b) for a, b in zip(loop, ema.average))


def test_a_device_flag_skips_the_update_exactly_or_applies_it():
    model, ema = averaged(3)
    before = [a.clone() for a in ema.average]
    train_step(model)
    ema.update(torch.tensor(False))  # a step the optimizer skipped
    assert all(torch.equal(a, b) for a, b in zip(before, ema.average)) and ema.updates == 4
    ema.update(torch.tensor(True))
    d = min(0.9, 6 / 15)
    for a, b, p in zip(ema.average, before, ema.params):
        torch.testing.assert_close(a, torch.lerp(b, p, 1 - d))
