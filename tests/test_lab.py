"""The memory lab (data/memory.py; its tasks: tasks/answer.py, tasks/regress.py): generated tasks
that are what they say, models that really learn them, every model family on every task, and
exact resume.

Each generator is checked by a hand-written oracle that reads the answer off the input: a task
whose answer were not in its input (or sat before what it depends on) would fail it.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from seqexp.build import build_data, build_model, locate
from seqexp.commands import evaluate
from seqexp.configs import CONFIG_DIR
from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.tasks.base import IGNORE
from seqexp.train import train
from tests.helpers import (REPORTS_OFF, STOP, TOTAL, assert_same_training, lm_capable, make_cfg, resume_run,
                           run_until_signal)

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["copy", "selective_copy", "recall", "adding"]
SMALL = ["data.size=64", "data.eval_size=32", "data.batch_size=8"]
QUICK = ["trainer.progress=false", "trainer.device=cpu", "logging.tensorboard=false"]


def data_of(kind: str, *extra: str, seed: int = 0):
    cfg = make_cfg(f"data={kind}", *SMALL, *extra)
    validate(cfg)
    return build_data(cfg.data, seed=seed)


def rows(split: dict) -> set[bytes]:
    return {r.numpy().tobytes() for r in split["tokens"]}


# ----------------------------------------------------------------------------- oracles
def oracle_copy(tokens: torch.Tensor, M: int) -> torch.Tensor:
    """The first M tokens, written at the last M positions."""
    out = torch.full_like(tokens, IGNORE)
    out[:, -M:] = tokens[:, :M]
    return out


def oracle_selective_copy(tokens: torch.Tensor, M: int) -> torch.Tensor:
    """The symbols (ids >= 2) before the markers, in order, written at the markers."""
    out = torch.full_like(tokens, IGNORE)
    for i, row in enumerate(tokens):
        body = row[:-M]
        out[i, -M:] = body[body >= 2]
    return out


def oracle_recall(tokens: torch.Tensor, D: int) -> torch.Tensor:
    """At each key after the pairs: the value stored beside that key."""
    out = torch.full_like(tokens, IGNORE)
    for i, row in enumerate(tokens.tolist()):
        memory = dict(zip(row[0 : 2 * D : 2], row[1 : 2 * D : 2]))
        for t in range(2 * D, len(row)):
            if row[t] in memory:
                out[i, t] = memory[row[t]]
    return out


def oracle_adding(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """The sum of the two marked values (ids >= levels)."""
    marked = tokens >= levels
    return (((tokens % levels).float() + 0.5) / levels * marked).sum(1)


def oracle(data, tokens: torch.Tensor) -> torch.Tensor:
    kind = data.kind
    if kind == "copy":
        return oracle_copy(tokens, data.num_symbols)
    if kind == "selective_copy":
        return oracle_selective_copy(tokens, data.num_symbols)
    if kind == "recall":
        return oracle_recall(tokens, data.num_pairs)
    return oracle_adding(tokens, data.levels)


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("kind", KINDS)
def test_a_generator_has_its_shapes_and_a_handwritten_oracle_solves_every_split(kind):
    data = data_of(kind, "data.length=24", "data.eval_lengths=[36]")
    assert set(data.splits) == {"train", "val", "test", "val@36", "test@36"}
    kw = data.model_kwargs()
    assert kw["max_len"] == data.total_length(36)  # attention's context covers the longest split
    for name, split in data.splits.items():
        L = 36 if name.endswith("@36") else 24
        tokens, targets = split["tokens"], split["targets"]
        assert tokens.shape == (64 if name == "train" else 32, data.total_length(L))
        assert int(tokens.min()) >= 0 and int(tokens.max()) < kw["vocab_size"]
        if kind == "adding":
            assert kw["head"] == "classify" and kw["num_outputs"] == 1 and targets.shape == (len(tokens),)
            torch.testing.assert_close(oracle(data, tokens), targets, rtol=0, atol=1e-6)
        else:
            assert kw["head"] == "lm" and kw["num_outputs"] == kw["vocab_size"] and targets.shape == tokens.shape
            assert torch.equal(oracle(data, tokens), targets), name  # 100%, every answer position and no other
    for batch in data.batches("train", stateful=True):  # every example on its own, for every model
        assert batch["carry"] is False and batch["tokens"].shape[0] == 8
        assert torch.equal(batch["lengths"], torch.full((8,), batch["tokens"].shape[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_generator_is_a_function_of_the_seed_with_disjoint_splits(kind):
    a, b, other = data_of(kind, seed=3), data_of(kind, seed=3), data_of(kind, seed=4)
    for name in a.splits:
        assert torch.equal(a.splits[name]["tokens"], b.splits[name]["tokens"])
        assert not torch.equal(a.splits[name]["tokens"], other.splits[name]["tokens"])
    assert a.state() == b.state() and a.state()["fingerprint"] != other.state()["fingerprint"]
    train, val, test = (rows(a.splits[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    epoch = [torch.cat([b["tokens"] for b in a.batches("train", stateful=False, epoch=e)]) for e in (0, 1)]
    assert rows({"tokens": epoch[0]}) == rows({"tokens": epoch[1]}) and not torch.equal(*epoch)  # reshuffled
    assert torch.equal(next(a.batches("train", stateful=False, epoch=1, start=2))["tokens"],
                       list(b.batches("train", stateful=False, epoch=1))[2]["tokens"])  # resumable mid-epoch


def test_fresh_training_data_is_new_each_epoch_and_the_same_for_the_same_epoch():
    data = data_of("copy", "data.fresh=true")
    assert data.splits["train"] is None  # nothing drawn ahead of the epoch
    e0, e0_again, e1 = (torch.cat([b["tokens"] for b in data.batches("train", stateful=False, epoch=e)])
                        for e in (0, 0, 1))
    assert torch.equal(e0, e0_again) and not (rows({"tokens": e0}) & rows({"tokens": e1}))
    assert not (rows({"tokens": e0}) & rows(data.splits["val"]))
    assert data.num_batches("train", stateful=False) == 8


def test_bad_knobs_are_refused_before_any_data():
    for bad in (["data=recall", "data.length=20"],  # 8 pairs and 8 queries need 24
                ["data=recall", "data.num_pairs=40"],  # more distinct keys than the alphabet
                ["data=adding", "data.eval_lengths=[1]"],
                ["data=copy", "data.size=4", "data.batch_size=8"]):
        with pytest.raises(UserError, match="data\\."):
            validate(make_cfg(*bad))


# ----------------------------------------------------------------------------- every model family
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_family_trains_a_step_on_every_task_or_refuses_it_in_one_line(model_name, kind):
    short = {"copy": ["data.length=6", "data.num_symbols=2"], "selective_copy": ["data.length=6", "data.num_symbols=2"],
             "recall": ["data.num_pairs=2"], "adding": ["data.length=6"]}[kind]
    cfg = make_cfg(f"model={model_name}", f"data={kind}", *SMALL, *short)
    head = locate(cfg.data._target_).task.head
    try:
        validate(cfg)
        data = build_data(cfg.data, seed=0)
        model = build_model(cfg.model, data.model_kwargs())
    except UserError as e:
        # the family itself refuses what it cannot do (a bag of n-grams neither writes answers nor
        # regresses), in one line naming it; a language task only where its check_config says so
        assert "\n" not in str(e) and f"model={model_name}" in str(e), e
        assert head != "lm" or not lm_capable(model_name), e
        return
    assert head != "lm" or lm_capable(model_name)
    model.prepare(lambda: data.batches("train", stateful=model.stateful))
    batch = next(data.batches("train", stateful=model.stateful))
    logits, _ = model(batch["tokens"], batch["lengths"], None)  # carry is False: no state in
    B, T = batch["tokens"].shape
    assert logits.shape == ((B, 1) if kind == "adding" else (B, T, data.model_kwargs()["vocab_size"]))
    loss = data.task.loss(logits, batch)
    loss.backward()
    assert torch.isfinite(loss)
    metrics = data.task.evaluate(model, data.batches("val", stateful=model.stateful), torch.device("cpu"), nullcontext)
    assert metrics["count"] == 32


# ----------------------------------------------------------------------------- real learning
def test_a_tiny_attention_model_learns_to_copy(tmp_path, capsys):
    run = tmp_path / "run"
    metrics = train(make_cfg("data=copy", "data.length=5", "data.num_symbols=3", "data.alphabet=4", "data.size=2000",
                             "data.eval_size=200", "data.eval_lengths=[8]", "model=attention", "model.d_model=32",
                             "model.n_heads=2", "model.n_layers=2", "optimizer.lr=3e-3", "scheduler.warmup_steps=10",
                             "trainer.max_steps=80", "trainer.eval_every=40", *QUICK), run)
    assert metrics["task"] == "answer" and metrics["objective"]["metric"] == "val/exact"  # data_defaults/lab.yaml
    best = metrics["best"]
    assert best["val/exact"] >= 0.95  # whole answers right, on sequences it never saw
    assert metrics["test"]["test/exact"] >= 0.95  # the held-out test split, on the best weights
    assert "val/exact@8" in best and "test/exact@8" in metrics["test"]  # a longer gap, measured
    for split, suffix in (("val", ""), ("val@8", "@8")):  # the checkpoint alone gives the same numbers
        evaluate.main([str(run), f"split={split}", f"out={tmp_path / 'eval.json'}"])
        again = json.loads((tmp_path / "eval.json").read_text())["metrics"]
        for k in ("loss", "acc", "exact"):
            assert again[f"{split}/{k}"] == pytest.approx(best[f"val/{k}{suffix}"], rel=1e-6), (split, k)
    capsys.readouterr()


def test_a_tiny_lstm_learns_adding_far_below_the_baseline(tmp_path):
    metrics = train(make_cfg("data=adding", "data.length=10", "data.levels=5", "data.size=2000", "data.eval_size=200",
                             "model=lstm", "model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1",
                             "optimizer.lr=1e-2", "scheduler.warmup_steps=10", "trainer.max_steps=120",
                             "trainer.eval_every=60", *QUICK), tmp_path / "run")
    best = metrics["best"]
    assert metrics["task"] == "regress" and 0.1 < best["val/baseline_mse"] < 0.2  # Var of a sum of two ~U(0, 1)
    assert best["val/mse"] < 0.2 * best["val/baseline_mse"], best
    assert metrics["test"]["test/mse"] < 0.2 * metrics["test"]["test/baseline_mse"]


# ----------------------------------------------------------------------------- resume
def lab_overrides(*extra: str) -> list[str]:
    """Fresh training data (a new set per epoch: 8 batches each, so the resumed part crosses
    epochs), dropout (the RNG matters), a length variant evaluated beside val."""
    return ["data=recall", "data.length=24", "data.num_pairs=4", "data.fresh=true", "data.eval_lengths=[32]",
            *SMALL, "model=lstm", "model.hidden_size=16", "model.embed_dim=8", "model.dropout=0.2",
            "model.num_layers=2", f"trainer.max_steps={TOTAL}", "trainer.eval_every=10", "trainer.checkpoint_every=10",
            "trainer.log_every=3", "trainer.progress=false", "trainer.device=cpu", "scheduler.warmup_steps=2",
            *REPORTS_OFF, *extra]


def test_resume_is_exact_on_a_lab_task(tmp_path: Path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    metrics = train(make_cfg(*lab_overrides()), straight)
    assert "val/exact@32" in metrics["final"]
    run_until_signal(lab_overrides(), resumed, STOP)
    resume_run(lab_overrides(), resumed)
    assert_same_training(straight, resumed)
