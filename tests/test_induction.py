"""The induction-heads task (data/induction.py): what it generates is what it says -- a
hand-written oracle reads every answer off the input -- its splits never share an example, and
its other lengths are evaluated beside the test split only (data_defaults/induction.yaml)."""

from __future__ import annotations

import pytest
import torch

from seqexp.build import build_data
from seqexp.config import validate
from seqexp.data.induction import SPECIAL
from seqexp.errors import UserError
from seqexp.tasks.base import IGNORE
from seqexp.train import train
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data=induction", "data.size=64", "data.eval_size=32", "data.batch_size=8"]


def data_of(*extra: str, seed: int = 0):
    cfg = make_cfg(*SMALL, *extra)
    validate(cfg)
    return build_data(cfg.data, seed=seed)


def oracle(tokens: torch.Tensor) -> torch.Tensor:
    """At the last position, the token that followed the first special token; nothing elsewhere."""
    out = torch.full_like(tokens, IGNORE)
    for i, row in enumerate(tokens.tolist()):
        first = row.index(SPECIAL)
        assert row.count(SPECIAL) == 2 and first <= len(row) - 3  # once inside, once last
        out[i, -1] = row[first + 1]
    return out


def test_an_oracle_that_looks_the_answer_up_solves_every_split_at_every_length():
    data = data_of("data.length=12", "data.eval_lengths=[24,48]")
    assert set(data.splits) == {"train", "val", "test", "val@24", "test@24", "val@48", "test@48"}
    kw = data.model_kwargs()
    assert kw["head"] == "lm" and kw["vocab_size"] == 17 and kw["max_len"] == 48  # 16 symbols and "!"
    for name, split in data.splits.items():
        tokens = split["tokens"]
        assert tokens.shape[1] == (int(name.split("@")[1]) if "@" in name else 12), name
        assert torch.equal(oracle(tokens), split["targets"]), name  # 100%, and no other answer position
    # the special token's first place is spread over the sequence: the distance back varies
    first = (data.splits["test@48"]["tokens"] == SPECIAL).int().argmax(1)
    assert first.min() <= 5 and first.max() >= 40


def test_the_splits_are_disjoint_and_a_function_of_the_seed():
    a, b, other = data_of(seed=3), data_of(seed=3), data_of(seed=4)
    for name in a.splits:
        assert torch.equal(a.splits[name]["tokens"], b.splits[name]["tokens"])
        assert not torch.equal(a.splits[name]["tokens"], other.splits[name]["tokens"])
    rows = {s: {r.numpy().tobytes() for r in a.splits[s]["tokens"]} for s in ("train", "val", "test")}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert len(rows["train"]) == 64  # no example twice either


def test_lengths_too_short_for_the_pattern_are_refused():
    for bad in (["data.length=2"], ["data.eval_lengths=[2]"], ["data.alphabet=1"]):
        with pytest.raises(UserError, match="data\\.(length|alphabet)"):
            data_of(*bad)


def test_the_other_lengths_are_measured_beside_the_test_split_only(tmp_path):
    """data_defaults/induction.yaml: logging.length_variants.validation=false -- val@L is never
    evaluated while training, test@L is, once, on the best weights."""
    m = train(make_cfg(*SMALL, "data.length=8", "data.eval_lengths=[16]", "model=lstm", "model.hidden_size=16",
                       "model.embed_dim=8", "model.num_layers=1", "trainer.max_steps=4", "trainer.eval_every=2",
                       "trainer.checkpoint_every=2", "trainer.progress=false", "trainer.device=cpu",
                       "logging.tensorboard=false"), tmp_path / "run")
    assert m["target"]["metric"] == "val/exact" and m["target"]["value"] == 0.99  # the lab's target (lab.yaml)
    assert "val/exact" in m["final"] and not any("@" in k for k in m["final"])
    assert {"test/exact", "test/exact@16"} <= set(m["test"])
