"""Gradient accumulation (trainer.accumulate=K): K micro-batches of B rows update the weights as
one batch of K x B rows; stateful BPTT chunks follow each other across micro-batches; every
count is in optimizer steps; resume is exact and a changed K is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.build import build_model, instantiate
from seqexp.checkpoint import read as read_checkpoint
from seqexp.distributed import Dist, Local
from seqexp.errors import UserError
from seqexp.tasks.base import IGNORE
from seqexp.tasks.classify import Classification
from seqexp.tasks.lm import LanguageModeling
from seqexp.train import train
from seqexp.trainer import Trainer
from tests.helpers import (TINY, assert_same_training, close, close_weights, ddp_overrides_for, final_state,
                           hand_trainer, make_cfg, resume_run, run_until_signal, scalars, take, tiny_overrides,
                           torchrun)

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 12, 10  # vocabulary, longest sequence


def lm_batch(g: torch.Generator, rows: int, ignored: int) -> dict:
    """Windows (no carried state); the last `ignored` targets of the first row are padding."""
    tokens = torch.randint(1, V, (rows, T), generator=g)
    targets = torch.randint(1, V, (rows, T), generator=g)
    targets[0, T - ignored:] = IGNORE
    return {"tokens": tokens, "targets": targets, "carry": False, "num_tokens": int((targets != IGNORE).sum())}


def classify_batch(g: torch.Generator, lengths: list[int], width: int) -> dict:
    """Reviews of the given lengths, padded with id 0 to `width`."""
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, V, (n,), generator=g)
    return {"tokens": tokens, "lengths": torch.tensor(lengths), "targets": torch.randint(0, 2, (len(lengths),), generator=g),
            "carry": False, "num_tokens": sum(lengths)}


def concat(micro: list[dict]) -> dict:
    """The K micro-batches as one batch; classification re-padded to the longest review."""
    width = max(b["tokens"].shape[1] for b in micro)
    pad = [torch.nn.functional.pad(b["tokens"], (0, width - b["tokens"].shape[1])) for b in micro]
    out = {"tokens": torch.cat(pad), "targets": torch.cat([b["targets"] for b in micro]), "carry": False,
           "num_tokens": sum(b["num_tokens"] for b in micro)}
    if "lengths" in micro[0]:
        out["lengths"] = torch.cat([b["lengths"] for b in micro])
    return out


def steps_of(task: str, seed: int) -> list[list[dict]]:
    """Three steps of two micro-batches whose loss terms differ, so a mean of means is wrong."""
    g = torch.Generator().manual_seed(seed)
    if task == "lm":
        return [[lm_batch(g, 2, 0), lm_batch(g, 3, 7)] for _ in range(3)]
    return [[classify_batch(g, [3, 7, 5], 7), classify_batch(g, [10, 2, 4, 9, 6], 10)] for _ in range(3)]


def make_trainer(model_name: str, task, accumulate: int, tmp_path) -> Trainer:
    cfg = make_cfg(*TINY[model_name], "model.dropout=0.0", "trainer.device=cpu", "trainer.progress=false",
                   f"trainer.accumulate={accumulate}", "scheduler=constant")
    kwargs = dict(vocab_size=V, num_outputs=V if task.head == "lm" else 2, head=task.head, max_len=T)
    torch.manual_seed(0)
    return hand_trainer(cfg, build_model(cfg.model, kwargs), task, tmp_path, total_steps=3, batches=6)


def close_models(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    # atol: Adam turns float noise in gradients that are zero in exact arithmetic into ~lr x 1e-3
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("task", [LanguageModeling(), Classification()], ids=["lm", "classify"])
@pytest.mark.parametrize("model", ["rnn", "lstm", "attention"])
def test_k_micro_batches_update_as_one_batch_of_all_their_rows(model, task, tmp_path, monkeypatch):
    steps = steps_of(task.head, seed=1)
    accumulated, whole = make_trainer(model, task, 2, tmp_path), make_trainer(model, task, 1, tmp_path)
    for micro in steps:
        take(accumulated, micro)
        take(whole, [concat(micro)])
    assert close_models(accumulated.model, whole.model)

    # the weighting matters: the mean of the micro-batches' mean losses is another update
    monkeypatch.setattr(type(task), "loss_terms", lambda self, batch: 1)
    naive = make_trainer(model, task, 2, tmp_path)
    for micro in steps:
        take(naive, micro)
    assert not close_models(naive.model, whole.model)


def test_stateful_micro_batches_are_consecutive_chunks_and_steps_count_updates(tiny_text, tmp_path, monkeypatch):
    """Micro-batch k of step s is chunk s*K + k of every stream, starting from chunk s*K + k - 1's
    final state (detached); the weights change once per K chunks; every interval is in steps."""
    from seqexp.models.recurrent import RecurrentModel
    K, seen = 3, []
    original = RecurrentModel.forward

    def spy(self, tokens, lengths=None, state=None):
        logits, new = original(self, tokens, lengths, state)
        if self.training:
            seen.append((tokens.clone(), state, new.detach().clone(), self.embed.weight.detach().clone()))
        return logits, new

    monkeypatch.setattr(RecurrentModel, "forward", spy)
    cfg = make_cfg(*tiny_overrides("gru", tiny_text, f"trainer.accumulate={K}", "data.batch_size=8", "data.seq_len=64"))
    metrics = train(cfg, tmp_path)
    data = instantiate(cfg.data, seed=cfg.trainer.seed)
    chunks = list(data.batches("train", stateful=True))
    assert metrics["steps"] == 12 and len(seen) == 12 * K
    assert len(chunks) % K and 12 > len(chunks) // K  # crosses epochs, each leaving out its last chunks
    assert metrics["epochs"] == pytest.approx(12 / (len(chunks) // K), abs=1e-4)
    for i, (tokens, state_in, _, weights) in enumerate(seen):
        assert torch.equal(tokens, chunks[i % (len(chunks) // K * K)]["tokens"])
        if i % (len(chunks) // K * K) == 0:
            assert state_in is None  # a new epoch
        else:
            assert torch.equal(state_in, seen[i - 1][2]) and not state_in.requires_grad
        if i:  # updated only before the first micro-batch of a step
            assert torch.equal(weights, seen[i - 1][3]) == (i % K != 0), i
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [6, 12]
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6, 9, 12]
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 12
    assert sorted(f.name for f in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_000006.pt", "step_000012.pt"]
    state = read_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]
    assert state["scheduler"]["last_epoch"] == 12  # the schedule advanced once per optimizer step
    per_epoch = len(chunks) // K
    assert state["batch_in_epoch"] % K == 0  # in micro-batches, always at a step's end
    assert state["epoch"] * per_epoch + state["batch_in_epoch"] // K == 12 and state["epoch"] >= 1


@pytest.mark.parametrize("model", ["lstm", "attention"])
def test_resume_with_accumulation_is_exact_and_a_changed_k_is_refused(model, tiny_text, tmp_path):
    """A checkpoint is written only between optimizer steps, when no gradient is half
    accumulated: the trainer state there is everything, so 5 + 7 steps equal 12 exactly."""
    overrides = tiny_overrides(model, tiny_text, "trainer.accumulate=2", "model.dropout=0.2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(*overrides), straight)
    run_until_signal(overrides, resumed, 5)
    other = tmp_path / "other"
    shutil.copytree(resumed, other)
    resume_run(overrides, resumed)
    assert_same_training(straight, resumed)
    with pytest.raises(UserError, match="trainer.accumulate: 2 -> 3"):
        resume_run(overrides, other, "trainer.accumulate=3")


def test_accumulate_is_validated(tiny_text, tmp_path):
    with pytest.raises(UserError, match="trainer.accumulate must be >= 1"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.accumulate=0")), tmp_path / "a")
    with pytest.raises(UserError, match="trainer.accumulate=1000 needs that many training batches"):
        train(make_cfg(*tiny_overrides("rnn", tiny_text, "trainer.accumulate=1000")), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_ddp_synchronises_gradients_once_per_step(tmp_path):
    """The first K - 1 backward passes of a step run under the DDP module's no_sync()."""
    from contextlib import contextmanager
    task = LanguageModeling()
    trainer = make_trainer("lstm", task, 3, tmp_path)
    entered = []

    @contextmanager
    def no_sync():
        entered.append(True)
        yield

    class OneRank(Local):  # one process, with DDP's choice of when to synchronise (the real method)
        no_sync = Dist.no_sync

    trainer.update.dist = OneRank(device=torch.device("cpu"))
    trainer.update.net.no_sync = no_sync  # what the DDP wrapper offers
    g = torch.Generator().manual_seed(0)
    take(trainer, [lm_batch(g, 2, 0) for _ in range(3)])
    assert len(entered) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "imdb"])
def test_two_processes_accumulate_as_one(kind, request, tmp_path):
    """gloo, 2 processes, K=2: the same weights as 1 process with K=2 (IMDB: padded reviews and a
    short last batch, so each rank's share of the loss terms differs)."""
    overrides = ddp_overrides_for(kind, "lstm", request, "trainer.accumulate=2", "trainer.max_steps=6",
                              "trainer.eval_every=3", "trainer.checkpoint_every=3")
    ddp = tmp_path / "ddp"
    torchrun([*overrides, f"hydra.run.dir={ddp}"], tmp_path)
    one = tmp_path / "one"
    train(make_cfg(*overrides), one)
    for tag in ("train/loss", "val/loss"):
        assert close(scalars(ddp, tag), scalars(one, tag)), tag
    assert close_weights(final_state(ddp), final_state(one))
