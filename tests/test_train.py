"""End to end: the training script per model, the trainer's state carrying, checkpoints, metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.build import instantiate
from seqexp.checkpoint import TRAINING_STATE
from seqexp.checkpoint import read as read_checkpoint
from seqexp.ema import EMA
from seqexp.errors import UserError
from seqexp.inference import build_model
from seqexp.tasks.lm import LanguageModeling
from seqexp.train import train
from seqexp.trainer import Trainer
from seqexp.update import Update
from tests.helpers import ROOT, make_cfg, poison_loss_at, tiny_overrides


@pytest.mark.parametrize("model,process", [("rnn", False), ("gru", False), ("attention", False),
                                           pytest.param("lstm", True, marks=pytest.mark.slow)],
                         ids=["rnn", "gru", "attention", "lstm-script"])
def test_train_script_writes_checkpoints_metrics_and_events(model, process, tiny_text, tmp_path, cli, capsys,
                                                           monkeypatch):
    """The command line in-process (the `cli` fixture); for one model, scripts/train.py in its own
    process, as a user runs it."""
    run = tmp_path / "run"
    argv = [*tiny_overrides(model, tiny_text, "logging.sample.chars=20"), f"hydra.run.dir={run}"]
    if process:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *argv],
                           capture_output=True, text=True, cwd=tmp_path, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout
    else:
        monkeypatch.chdir(tmp_path)
        cli(*argv)
        out = capsys.readouterr().out
    assert "--- sample at step 12 ---" in out
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", ".hydra/config.yaml"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 12
    assert metrics["final"]["val/loss"] > 0 and metrics["num_params"] > 0
    assert metrics["final"]["val/bpc"] == pytest.approx(metrics["final"]["val/loss"] / 0.6931471805599453)
    events = EventAccumulator(str(run)).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss", "val/bpc", "val/ppl",
                "time/train_s"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("val/loss")] == [6, 12]
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6, 9, 12]
    assert "samples/text_summary" in tags["tensors"]


@pytest.mark.parametrize("ema", ["trainer.ema=0.0", "trainer.ema=0.5"])
def test_checkpoint_rebuilds_the_model_alone(ema, tiny_text, tmp_path):
    """best.pt loads with weights_only=True and, with nothing but itself, reproduces the val loss
    (with weight averaging: the val loss of the averaged weights, which are its "model")."""
    metrics = train(make_cfg(*tiny_overrides("lstm", tiny_text, ema)), tmp_path)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)  # plain values only
    cfg = ckpt["config"]
    model = instantiate(cfg["model"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    data = instantiate(cfg["data"], seed=cfg["trainer"]["seed"], saved=ckpt["data"])
    val = LanguageModeling().evaluate(model, data.batches("val", stateful=True), torch.device("cpu"),
                                 lambda: torch.autocast("cpu", enabled=False))
    assert val["loss"] == pytest.approx(metrics["best"]["val/loss"], rel=1e-6)
    assert ckpt["trainer"]["step"] == metrics["best_step"]
    # the weights for use, without what only resume needs (optimizer moments, RNG, carried state):
    # last.pt holds those
    assert not set(TRAINING_STATE) & set(ckpt["trainer"])
    assert set(TRAINING_STATE) - {"ranks"} <= set(read_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"])


def test_weight_averaging_saves_the_average_and_trains_the_weights(tiny_text, tmp_path, monkeypatch):
    """trainer.ema: the checkpoint's "model" is the moving average of the weights after each step
    (decay ramped as (1 + n) / (10 + n) up to trainer.ema); the trained weights go on unaveraged.
    Attention with tied embeddings: the average must reach both names of the shared weight."""
    decay, seen, initial = 0.7, [], []
    update, fit = EMA.update, Trainer.fit

    def update_ema(self, *args):
        seen.append([p.detach().clone() for p in self.params])  # the weights after this step
        update(self, *args)

    def spy_fit(self):
        initial.extend(e.clone() for e in self.average.average)  # the average starts at the initial weights
        return fit(self)

    monkeypatch.setattr(EMA, "update", update_ema)
    monkeypatch.setattr(Trainer, "fit", spy_fit)
    run = tmp_path / "run"
    train(make_cfg(*tiny_overrides("attention", tiny_text, f"trainer.ema={decay}")), run)
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    names = [n for n, _ in build_model(ckpt).named_parameters()]
    assert len(seen) == 12 and ckpt["trainer"]["ema_updates"] == 12

    ema = initial
    for n, weights in enumerate(seen, start=1):
        d = min(decay, (1 + n) / (10 + n))
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights)]
    for name, e, w in zip(names, ema, seen[-1]):
        assert torch.allclose(ckpt["model"][name], e, atol=1e-6), name
        assert torch.equal(ckpt["trainer"]["weights"][name], w), name
        assert not torch.equal(e, w), name  # averaging did something to every parameter
    assert "head.weight" in ckpt["model"] and torch.equal(ckpt["model"]["head.weight"], ckpt["model"]["tok_emb.weight"])


def test_same_seed_same_metrics(tiny_text, tmp_path):
    for name in ("a", "b", "c"):
        seed = "trainer.seed=7" if name != "c" else "trainer.seed=8"
        train(make_cfg(*tiny_overrides("attention", tiny_text, seed)), tmp_path / name)
    a, b, c = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "abc")
    for m in (a, b, c):
        m.pop("timing")  # wall time: the only entry allowed to differ
    assert a == b
    assert a != c


def test_trainer_carries_state_between_chunks_and_resets_each_epoch(tiny_text, tmp_path):
    """Spy on the model: chunk i+1 starts from chunk i's final state; epoch starts from zero."""
    cfg = make_cfg(*tiny_overrides("gru", tiny_text, "trainer.max_epochs=2", "trainer.max_steps=-1",
                                   "data.batch_size=16", "data.seq_len=64"))
    from seqexp.models.recurrent import RecurrentModel
    seen = []
    original = RecurrentModel.forward

    def spy(self, tokens, lengths=None, state=None):
        logits, new = original(self, tokens, lengths, state)
        if self.training:
            seen.append((state, new.detach().clone()))
        return logits, new

    RecurrentModel.forward = spy
    try:
        train(cfg, tmp_path)
    finally:
        RecurrentModel.forward = original
    per_epoch = len(seen) // 2
    assert per_epoch >= 3
    for i, (state_in, _) in enumerate(seen):
        if i % per_epoch == 0:
            assert state_in is None  # fresh state at each epoch start
        else:
            assert torch.equal(state_in, seen[i - 1][1])  # the previous chunk's final state
            assert not state_in.requires_grad  # truncated: no gradient into earlier chunks


def test_nonfinite_loss_stops_before_the_update(tiny_text, tmp_path, monkeypatch):
    from seqexp.guard import NonFiniteError
    poison_loss_at(monkeypatch, {8})
    with pytest.raises(NonFiniteError, match="non-finite values at step 8") as e:
        train(make_cfg(*tiny_overrides("lstm", tiny_text)), tmp_path)
    assert str(tmp_path / "checkpoints" / "last.pt") in str(e.value)  # the last good one, step 6
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_skip_policy_drops_the_batch(tiny_text, tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {4, 5})
    metrics = train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.nonfinite=skip")), tmp_path)
    assert metrics["skipped_batches"] == 2 and metrics["steps"] == 12
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_batches")] == [(4, 1.0), (5, 2.0)]


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_with_a_finite_loss_stops_too(tiny_text, tmp_path, monkeypatch):
    from seqexp.tasks.lm import LanguageModeling
    from seqexp.guard import NonFiniteError
    original, count = LanguageModeling.loss, [0]

    def loss(self, logits, batch):
        count[0] += 1
        out = original(self, logits, batch)
        return InfiniteGradient.apply(out) if count[0] == 9 else out

    monkeypatch.setattr(LanguageModeling, "loss", loss)
    with pytest.raises(NonFiniteError, match=r"at step 9 \(loss=[\d.]+, grad_norm=(inf|nan)\)"):
        train(make_cfg(*tiny_overrides("attention", tiny_text)), tmp_path)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["step"] == 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_training_time_budget_stops_early_and_evaluates(tiny_text, tmp_path, monkeypatch):
    import seqexp.trainer as trainer_mod
    clock = iter(range(0, 10**6, 10))  # each reading of the clock advances 10 s
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: next(clock))
    metrics = train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.max_time_s=45",
                                             "trainer.max_steps=1000")), tmp_path)
    assert 1 <= metrics["steps"] < 12
    assert metrics["final"]["val/loss"] > 0  # evaluated at the step the budget ran out
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in events.Scalars("val/loss")][-1] == metrics["steps"]


# ----------------------------------------------------------------------------- nothing non-finite is saved
def refuse(name: str):
    raise AssertionError(f"metrics.json is not strict JSON: {name}")


def saved_metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text(), parse_constant=refuse)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_an_update_that_makes_the_weights_infinite_is_never_evaluated_or_saved(policy, tiny_text, tmp_path):
    """Issue 22 item 1, as reported: with lr=1e30 (AdamW) the loss and gradient norm are still finite
    at the step whose update makes the weights infinite (decoupled weight decay alone multiplies
    them by lr x wd). Neither policy may evaluate, save or call them good; skip cannot undo it."""
    from seqexp.checkpoint import nonfinite
    from seqexp.guard import NonFiniteError

    overrides = tiny_overrides("rnn", tiny_text, "optimizer.lr=1e30", "trainer.checkpoint_every=2",
                               "trainer.eval_every=2", f"trainer.nonfinite={policy}")
    with pytest.raises(NonFiniteError, match=r"the update at step \d+ made the weights non-finite"):
        train(make_cfg(*overrides), tmp_path)
    for f in (tmp_path / "checkpoints").glob("*.pt"):
        assert nonfinite(read_checkpoint(f)) == [], f
    metrics = saved_metrics(tmp_path)
    assert metrics["status"] == "stopped: nonfinite" and "made the weights non-finite" in metrics["error"]


def test_weights_made_infinite_by_a_later_update_stop_at_the_last_good_checkpoint(tiny_text, tmp_path, monkeypatch):
    """The update of step 8 leaves an infinite weight (a finite loss and gradient): the next step's
    finiteness read sees it, even with nonfinite=skip, and last.pt (step 6) is named as good."""
    from seqexp.guard import NonFiniteError

    original, calls = torch.amp.GradScaler.step, [0]

    def step(self, optimizer, *args, **kwargs):
        out = original(self, optimizer, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 8:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0][0] = float("inf")
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    with pytest.raises(NonFiniteError, match="the update at step 8 made the weights non-finite") as e:
        train(make_cfg(*tiny_overrides("lstm", tiny_text, "trainer.nonfinite=skip")), tmp_path)
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'}" in str(e.value)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["step"] == 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert saved_metrics(tmp_path)["status"] == "stopped: nonfinite"


def test_a_nonfinite_validation_result_is_never_best(tiny_text, tmp_path, monkeypatch):
    original, calls = Trainer.evaluate, [0]

    def evaluate(self, split="val"):
        metrics = original(self, split)
        calls[0] += 1
        return {**metrics, "loss": float("nan")} if calls[0] == 2 else metrics  # the evaluation at step 12

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    metrics = train(make_cfg(*tiny_overrides("rnn", tiny_text, "logging.sample.chars=0")), tmp_path)
    assert metrics["best_step"] == 6 and read_checkpoint(tmp_path / "checkpoints" / "best.pt")["trainer"]["step"] == 6
    saved = saved_metrics(tmp_path)  # strict JSON: the NaN is written as null
    assert saved["final"]["val/loss"] is None and saved["objective"]["best"] == metrics["best"]["val/loss"] > 0


@pytest.mark.parametrize("failure", [UserError("could not write last.pt (Permission denied)"), RuntimeError("boom")])
def test_a_run_that_fails_says_so_in_metrics_json(failure, tiny_text, tmp_path, monkeypatch):
    """Issue 22 item 5: a user error (exit 2) or a crash leaves "failed" and the error, not "running"."""
    original = Update.__call__

    def update(self, micro, carried, step):
        if step == 9:  # after 8 steps
            raise failure
        return original(self, micro, carried, step)

    monkeypatch.setattr(Update, "__call__", update)
    with pytest.raises(type(failure)):
        train(make_cfg(*tiny_overrides("rnn", tiny_text)), tmp_path)
    saved = saved_metrics(tmp_path)
    assert saved["status"] == "failed" and saved["steps"] == 6  # the rest as of the last evaluation (last.pt)
    assert saved["error"] == (str(failure) if isinstance(failure, UserError) else "RuntimeError: boom")


# ----------------------------------------------------------------------------- the plan and its estimate
def test_the_plan_counts_optimizer_steps_epochs_evaluations_and_what_is_left():
    from seqexp.plan import plan_line

    base = dict(start=0, steps_per_epoch=352, accumulate=1, eval_every=200, checkpoint_every=200, keep_last=3,
                max_time_s=0)
    every = "a checkpoint every 200 steps (the newest 3 kept)"
    # max_epochs-bound, with the test split after training
    assert plan_line(**{**base, "total": 1408, "after": ("test",)}) == \
        f"plan: 1,408 steps (4 epochs of 352), 8 evaluations, {every}, then the test split on the best checkpoint"
    # max_steps-bound, less than an epoch
    assert plan_line(**{**base, "total": 600, "steps_per_epoch": 1390}) == \
        f"plan: 600 steps (0.43 of an epoch of 1,390), 3 evaluations, {every}"
    # accumulation: optimizer steps of K micro-batches
    assert plan_line(**{**base, "total": 176, "steps_per_epoch": 176, "accumulate": 2}) == \
        "plan: 176 steps of 2 micro-batches (1 epoch of 176), 1 evaluation"
    # resumed at step 700: what is left (evaluations at 800, 1000, 1200, 1400 and the last step)
    assert plan_line(**{**base, "start": 700, "total": 1408}) == \
        f"plan: 708 more steps (700 -> 1,408; 4 epochs of 352), 5 evaluations, {every}"
    # max_time_s-bound: the budget may end it first
    assert plan_line(**{**base, "total": 352_000, "max_time_s": 600}) == \
        ("plan: at most 10 min 00 s of training, up to 352,000 steps (1,000 epochs of 352), an evaluation every "
         f"200 steps and at the end, {every}")


def test_a_run_logs_its_plan_then_estimates_training_and_evaluation_time(tiny_text, tmp_path, caplog):
    import logging
    overrides = tiny_overrides("rnn", tiny_text, "logging.sample.chars=0")
    with caplog.at_level(logging.INFO, logger="seqexp"):
        train(make_cfg(*overrides), tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    plan = [i for i, m in enumerate(lines) if m.startswith("plan: ")]
    assert [lines[i] for i in plan] == [
        "plan: 12 steps (0.073 of an epoch of 165), 2 evaluations, a checkpoint every 6 steps (the newest 3 kept)"]
    training = [i for i, m in enumerate(lines) if m.startswith("estimate: training about ")]
    evaluation = [i for i, m in enumerate(lines) if m.startswith("estimate: evaluation about ")]
    first_eval = lines.index(next(m for m in lines if m.startswith("step 6: ")))
    assert len(training) == len(evaluation) == 1  # once each
    assert plan[0] < training[0] < first_eval < evaluation[0]  # after the first window; after the first evaluation
    assert "s/step in the first logging window" in lines[training[0]]
    assert " more (1 x " in lines[evaluation[0]]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seqexp"):  # resumed: what is left
        train(make_cfg(*overrides, "trainer.max_steps=18", f"resume={tmp_path}"), tmp_path)
    assert [m for m in (r.getMessage() for r in caplog.records) if m.startswith("plan: ")] == \
        ["plan: 6 more steps (12 -> 18; 0.11 of an epoch of 165), 1 evaluation, a checkpoint every 6 steps "
         "(the newest 3 kept)"]


def test_a_single_run_shows_its_hparams_and_metrics_in_tensorboard(tiny_text, tmp_path):
    from tensorboard.plugins.hparams import api_pb2, metadata
    metrics = train(make_cfg(*tiny_overrides("rnn", tiny_text, "optimizer.lr=0.003")), tmp_path)
    events = EventAccumulator(str(tmp_path)).Reload()
    content = events.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values["optimizer.lr"] == pytest.approx(0.003) and values["trainer.max_steps"] == 12
    assert values["model"] == "RecurrentModel" and values["model.cell"] == "rnn" and values["optimizer"] == "AdamW"
    assert values["data.seq_len"] == 16 and values["trainer.precision"] == "fp32"
    assert not [k for k in values if k.startswith(("logging.", "sweep.", "resume"))]  # how it reports, not learns
    assert start.group_name == tmp_path.name and end.status == api_pb2.STATUS_SUCCESS
    # the HParams table's metric columns: the last value of each scalar tag
    assert events.Scalars("best/val/loss")[-1].value == pytest.approx(metrics["objective"]["best"])
    assert events.Scalars("val/loss")[-1].value == pytest.approx(metrics["final"]["val/loss"])
    assert events.Scalars("model/num_params")[-1].value == metrics["num_params"]


def test_a_long_evaluation_shows_progress_on_a_terminal_only(monkeypatch):
    import io

    import seqexp.evaluation as evaluation

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def shown(show: bool, stderr) -> str:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert list(evaluation.tracked(iter(range(4)), total=4, desc="test", show=show)) == [0, 1, 2, 3]
        return stderr.getvalue()

    monkeypatch.setattr(evaluation, "SHOW_AFTER_S", 0.0)  # as if each batch took long
    assert "test:   0%|" in shown(True, Terminal())  # (the bar is redrawn at most every 0.1 s)
    assert shown(False, Terminal()) == ""  # trainer.progress=false (or not the main process)
    assert shown(True, io.StringIO()) == ""  # stderr is a file or a pipe
    monkeypatch.setattr(evaluation, "SHOW_AFTER_S", 60.0)
    assert shown(True, Terminal()) == ""  # a short evaluation prints nothing

    calls = []  # the stop check runs before every batch; raising abandons the evaluation
    def stop():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        list(evaluation.tracked(iter(range(4)), total=4, desc="test", show=False, stop=stop))
    assert len(calls) == 3
