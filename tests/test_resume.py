"""Resume: N steps + resume + N steps equals 2N steps, bitwise; and every ingredient matters.

The protocol's helpers (tests/helpers.py) take a list of overrides, so any data kind plugs in:
add it to KINDS and to `overrides_for` (IMDB: a tiny labelled subset).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from seqexp.checkpoint import read as read_checkpoint
from seqexp.errors import UserError
from seqexp.resume import config_for_resume, resolve, resume_argv
from seqexp.train import train
from seqexp.trainer import Trainer
from seqexp.update import Update
from tests.helpers import (KINDS, STOP, TOTAL, assert_same_training, drop_carried_state, final_state, imdb_overrides,
                           make_cfg, overrides_for, resume_run, run_until_signal, same_tensors, scalars, snapshot,
                           straight_and_stopped, tiny_overrides)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- exactness
def drop_rng(monkeypatch):
    monkeypatch.setattr("seqexp.trainer.set_rng_state", lambda state: None)


def drop_position(monkeypatch):
    original = Trainer.load_state_dict

    def load(self, sd):
        original(self, sd)
        self.p.batch_in_epoch = 0  # as if only the epoch were known

    monkeypatch.setattr(Trainer, "load_state_dict", load)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", ["rnn", "lstm", "attention"])
def test_resume_is_bitwise_exact_and_every_ingredient_matters(kind, model, request, tmp_path, monkeypatch):
    overrides = overrides_for(kind, model, request)
    straight, partial = straight_and_stopped(overrides, tmp_path)  # resumed equal to straight, bitwise
    stopped = read_checkpoint(partial / "checkpoints" / "last.pt")["trainer"]  # the run as the signal left it
    progress = json.loads((partial / "metrics.json").read_text())
    assert stopped["step"] == STOP and progress["status"] == "preempted"
    assert stopped["batch_in_epoch"] > 0 and progress["epochs"] % 1 != 0  # mid-epoch
    resumed = tmp_path / "resumed"
    assert [s for s, _ in scalars(resumed, "train/loss")] == list(range(3, TOTAL + 1, 3))  # no step twice

    # the same resume without one ingredient must not reproduce the run
    variants = {"rng": drop_rng, "position": drop_position}
    if model != "attention" and kind == "char":  # classifiers carry no state between batches
        variants["carried state"] = drop_carried_state
    for name, patch in variants.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(partial, run)
        with monkeypatch.context() as m:
            patch(m)
            resume_run(overrides, run)
        assert not same_tensors(final_state(straight), final_state(run)), f"dropping {name} changed nothing"


@pytest.mark.parametrize("model", ["gru", "attention"])
def test_resume_with_muon_is_bitwise_exact_and_needs_both_optimizers_states(model, request, tmp_path, monkeypatch):
    """optimizer=muon holds two optimizers (muon.py): both states are saved and loaded, Muon's
    momentum as much as AdamW's moments."""
    overrides = overrides_for("char", model, request, "optimizer=muon")
    straight, partial = straight_and_stopped(overrides, tmp_path)

    from seqexp.muon import MuonAdamW

    original = MuonAdamW.load_state_dict

    def without_momentum(self, sd):
        for s in sd["state"].values():
            s.pop("momentum_buffer", None)
        original(self, sd)

    monkeypatch.setattr(MuonAdamW, "load_state_dict", without_momentum)
    resume_run(overrides, partial)
    assert not same_tensors(final_state(straight), final_state(partial)), "Muon's momentum changed nothing"


def test_resume_with_weight_averaging_is_exact_and_needs_the_average(request, tmp_path, monkeypatch):
    """trainer.ema: the average is part of the state. Resumed without it (the average restarted
    from the weights), the run's checkpoints and validation curve differ."""
    overrides = overrides_for("imdb", "lstm", request, "trainer.ema=0.8")
    straight, partial = straight_and_stopped(overrides, tmp_path)

    original = Trainer.restore

    def restore_without_average(self, ckpt, path):
        original(self, ckpt, path)
        self.average.average = [p.detach().clone() for p in self.average.params]

    monkeypatch.setattr(Trainer, "restore", restore_without_average)
    resume_run(overrides, partial)
    assert not same_tensors(final_state(straight), final_state(partial)), "dropping the average changed nothing"


def test_weight_averaging_may_be_switched_off_at_resume(request, tmp_path):
    """The average never feeds back into training, so a run that averaged for its first part and
    not after trains exactly the weights of a run that never averaged: a resume takes the trained
    weights from the trainer state, not the checkpoint's averaged "model"."""
    overrides = overrides_for("char", "lstm", request)
    plain, switched = tmp_path / "plain", tmp_path / "switched"
    train(make_cfg(*overrides), plain)
    run_until_signal([*overrides, "trainer.ema=0.9"], switched, STOP)
    resume_run(overrides, switched, "trainer.ema=0.0")
    assert same_tensors(final_state(plain), final_state(switched))
    assert scalars(plain, "train/loss") == scalars(switched, "train/loss")


def test_resume_from_an_earlier_step_checkpoint_rewrites_history_once(tiny_text, request, tmp_path):
    """Resuming a finished run from step 10: TensorBoard shows each step once, weights as before."""
    overrides = overrides_for("char", "lstm", request)
    first = tmp_path / "first"
    train(make_cfg(*overrides), first)
    again = tmp_path / "again"
    shutil.copytree(first, again)
    step10 = again / "checkpoints" / "step_000010.pt"
    train(make_cfg(*overrides, f"resume={step10}"), again)
    assert_same_training(first, again)
    events = [p.name for p in again.glob("events.out.tfevents.*")]
    assert len([e for e in events if not e.endswith(".hparams")]) == 2  # appended, not replaced
    assert len([e for e in events if e.endswith(".hparams")]) == 1  # the HParams entry: the latest run's
    assert sorted(p.name for p in (again / "checkpoints").glob("step_*")) == ["step_000010.pt", "step_000020.pt"]


def test_keep_last_prunes_step_checkpoints_but_never_best_or_the_resumed_one(tiny_text, tmp_path):
    overrides = tiny_overrides("gru", tiny_text, "trainer.checkpoint_every=2", "trainer.keep_last=2")
    train(make_cfg(*overrides), tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["best.pt", "last.pt", "step_000010.pt", "step_000012.pt"]
    assert read_checkpoint(ckpts / "best.pt")["trainer"]["step"] == 12
    # resume from step 10 with keep_last=1: it keeps step 10 all along, and the newest
    train(make_cfg(*overrides, "trainer.keep_last=1", "trainer.max_steps=18", "trainer.eval_every=100",
                   f"resume={ckpts / 'step_000010.pt'}"), tmp_path)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000010.pt", "step_000018.pt"]
    assert read_checkpoint(ckpts / "last.pt")["trainer"]["step"] == 18
    assert read_checkpoint(ckpts / "best.pt")["trainer"]["step"] in (12, 18)  # replaced only by a better one


def test_deterministic_flag_turns_on_deterministic_algorithms(tiny_text, tmp_path, monkeypatch):
    seen = []
    original = Update.step
    monkeypatch.setattr(Update, "step", lambda self, *a: (seen.append(torch.are_deterministic_algorithms_enabled()),
                                                          original(self, *a))[1])
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        train(make_cfg(*tiny_overrides("attention", tiny_text, "trainer.max_steps=2", "trainer.deterministic=true")),
              tmp_path)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [True, True]


# ----------------------------------------------------------------------------- what resume may change
@pytest.fixture(scope="module")
def finished_rnn(tmp_path_factory, tiny_text) -> tuple[list[str], Path]:
    overrides = tiny_overrides("rnn", tiny_text)
    run = tmp_path_factory.mktemp("finished") / "run"
    train(make_cfg(*overrides), run)
    return overrides, run


@pytest.mark.parametrize("override,named", [
    ("model.hidden_size=48", "model.hidden_size: 32 -> 48"),
    ("data.seq_len=32", "data.seq_len: 16 -> 32"),
    ("optimizer.lr=0.5", "optimizer.lr"),
    ("trainer.seed=1", "trainer.seed: 1337 -> 1"),
])
def test_resume_refuses_changes_to_what_is_learned(finished_rnn, override, named):
    overrides, run = finished_rnn
    before = snapshot(run)
    with pytest.raises(UserError, match="cannot resume") as e:
        train(make_cfg(*overrides, override, f"resume={run}"), run)
    assert named in str(e.value) and "start a new run" in str(e.value)
    assert snapshot(run) == before  # nothing written, not even an event file


def test_cli_config_is_the_saved_one_plus_allowed_overrides(finished_rnn):
    _, run = finished_rnn
    # what Hydra composes for `resume=RUN trainer.max_steps=20`: default model (lstm), ...
    command = [f"resume={run}", "trainer.max_steps=20", "logging.sample.chars=5"]
    cfg = config_for_resume(make_cfg(*command), command)
    assert cfg.model.cell == "rnn" and cfg.model.hidden_size == 32  # ... but the run's own model
    assert cfg.trainer.max_steps == 20 and cfg.logging.sample.chars == 5 and cfg.trainer.eval_every == 6
    command = [f"resume={run}", "model.hidden_size=64"]
    with pytest.raises(UserError, match="model.hidden_size: 32 -> 64"):
        train(config_for_resume(make_cfg(*command), command), run)
    command = [f"resume={run}", "model=attention"]
    with pytest.raises(UserError, match="model._target_"):
        train(config_for_resume(make_cfg(*command), command), run)
    with pytest.raises(UserError, match="in the run's own directory"):
        train(make_cfg(f"resume={run}"), run.parent / "elsewhere")


def test_data_may_move_but_not_change(tmp_path, tiny_text):
    text, moved = tmp_path / "text.txt", tmp_path / "moved.txt"
    shutil.copy(tiny_text, text)
    overrides = tiny_overrides("rnn", text, "trainer.max_steps=3")
    train(make_cfg(*overrides), tmp_path / "run")
    text.rename(moved)
    metrics = train(make_cfg(*overrides, f"data.path={moved}", "trainer.max_steps=4", f"resume={tmp_path / 'run'}"))
    assert metrics["steps"] == 4
    moved.write_text(moved.read_text().replace("the", "teh"))
    with pytest.raises(UserError, match="not the data"):  # (more steps: a finished run's resume reads no data)
        train(make_cfg(*overrides, f"data.path={moved}", "trainer.max_steps=5", f"resume={tmp_path / 'run'}"))


def test_resolve_run_dir_checkpoint_and_latest(tmp_path, monkeypatch):
    import os
    older = tmp_path / "outputs" / "2025-01-01" / "a" / "checkpoints" / "last.pt"
    newer = tmp_path / "outputs" / "multirun" / "2025-01-02" / "b" / "0_x=1" / "checkpoints" / "last.pt"
    for i, p in enumerate((older, newer)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1e9 + i, 1e9 + i))
    (newer.parent / ".last.pt.tmp-123").write_bytes(b"half")  # never picked
    monkeypatch.chdir(tmp_path)
    assert resolve("latest") == (newer.parent.parent, newer)
    assert resolve(str(older.parent.parent)) == (older.parent.parent, older)
    assert resolve(str(older)) == (older.parent.parent, older)
    for spec, match in [("nope", "no such run directory"), (str(tmp_path / "outputs"), "no checkpoints/last.pt")]:
        with pytest.raises(UserError, match=match):
            resolve(spec)
    (tmp_path / "loose.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="not in a run's checkpoints"):
        resolve(str(tmp_path / "loose.pt"))
    monkeypatch.chdir(tmp_path / "outputs" / "2025-01-01")
    with pytest.raises(UserError, match="resume=latest: no run"):
        resolve("latest")


def test_resume_argv_points_hydra_at_the_run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    argv = resume_argv([f"resume={tmp_path / 'run'}", "trainer.max_steps=9"])
    assert argv == ["trainer.max_steps=9", f"resume='{ckpt}'", f"hydra.run.dir='{tmp_path / 'run'}'",
                    "hydra.output_subdir=null"]
    assert resume_argv(["model=rnn"]) == ["model=rnn"]
    with pytest.raises(UserError, match="multirun"):
        resume_argv(["-m", f"resume={tmp_path / 'run'}"])


@pytest.mark.parametrize("form", [[], ["model.train_r=false", "model.w_adj=0", "model.beta=0.75"]],
                         ids=["nbsvm++", "nbsvm"])
def test_resume_of_the_ngram_model_loads_its_prepared_features(imdb_archive, tmp_path, monkeypatch, form):
    """The n-gram model's features come from prepare() on a fresh run; a resume takes them from
    the checkpoint (prepare is not run again) and continues exactly -- with the ratios fixed too
    (the optimizer then holds no state for them) and the interpolation read at evaluation."""
    from seqexp.models.ngram import NgramModel

    overrides = imdb_overrides("ngram", imdb_archive, tmp_path / "cache", f"trainer.max_steps={TOTAL}",
                               "trainer.eval_every=10", "trainer.checkpoint_every=10", *form)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(*overrides), straight)
    run_until_signal(overrides, resumed, STOP)

    def again(self, batches):
        raise AssertionError("prepare() ran again on resume")

    monkeypatch.setattr(NgramModel, "prepare", again)
    resume_run(overrides, resumed)
    assert_same_training(straight, resumed)
    assert (final_state(resumed)["model.keys"] < torch.iinfo(torch.int64).max).any()  # real features
