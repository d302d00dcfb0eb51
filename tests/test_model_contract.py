"""Every model config -- shipped, or found through the search path -- keeps the model contract.

Discovered, not listed: a new model family gets these checks from its YAML file alone. Each is
built from its own config (the sizes its YAML chooses) for each head its `check_config` accepts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqexp.build import instantiate, locate
from seqexp.configs import CONFIG_DIR
from seqexp.errors import UserError
from tests.helpers import EXTENSION, SEARCH, make_cfg

NAMES = sorted({p.stem for d in (CONFIG_DIR, EXTENSION / "configs") for p in (d / "model").glob("*.yaml")})
V, C, T = 17, 2, 10


def build(name: str, head: str) -> torch.nn.Module:
    node = make_cfg(SEARCH, f"model={name}").model
    try:
        locate(node._target_).check_config(node, head)
    except UserError:
        pytest.skip(f"model={name} does not do {head}")
    torch.manual_seed(0)
    model = instantiate(node, vocab_size=V, num_outputs=V if head == "lm" else C, head=head, max_len=32)
    tokens = torch.randint(1, V, (8, T))
    model.prepare(lambda: [{"tokens": tokens, "lengths": torch.full((8,), T), "targets": torch.arange(8) % C}])
    return model.eval()


def test_every_shipped_and_test_model_is_discovered():
    assert {"rnn", "lstm", "gru", "attention", "ngram", "conv"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_lm_shapes_and_causality(name):
    model = build(name, "lm")
    x = torch.randint(1, V, (2, T))
    base, _ = model(x)
    assert base.shape == (2, T, V)
    y = x.clone()
    y[:, 6] = (y[:, 6] % (V - 1)) + 1
    out, _ = model(y)
    torch.testing.assert_close(out[:, :6], base[:, :6], rtol=0, atol=1e-6)  # nothing before t sees t


@pytest.mark.parametrize("name", NAMES)
def test_classify_shapes_and_padding_never_changes_a_logit(name):
    model = build(name, "classify")
    x = torch.randint(1, V, (3, T))
    lengths = torch.tensor([T, 6, 2])
    garbage = x.clone()
    garbage[torch.arange(T)[None, :] >= lengths[:, None]] = 5  # other ids in the padding
    logits, _ = model(x, lengths)
    assert logits.shape == (3, C)
    torch.testing.assert_close(model(garbage, lengths)[0], logits, rtol=0, atol=1e-5)
    for i, n in enumerate(lengths.tolist()):  # alone, unpadded
        torch.testing.assert_close(model(x[i : i + 1, :n], lengths[i : i + 1])[0], logits[i : i + 1], rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("head", ["lm", "classify"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name, head):
    model = build(name, head).train()
    x = torch.randint(1, V, (8, T))
    if head == "lm":
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    else:
        logits, _ = model(x, torch.tensor([T, 9, 8, 7, 6, 5, 4, 3]))
        loss = F.cross_entropy(logits, torch.arange(8) % C)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"no gradient reaches {dead}"
