"""The hot loop decides on the device (issue 21 part 3): a non-finite step skips its update
without a host read, under nonfinite=stop and =skip, for every optimizer seqexp offers; the host
reads the verdicts at the log window or before a save; trainer.compile falls back to eager."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch

from seqexp.build import build_model
from seqexp.guard import NonFiniteError
from seqexp.tasks.lm import LanguageModeling
from seqexp.trainer import Trainer
from tests.helpers import TINY, hand_trainer, make_cfg, take

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 12, 10  # vocabulary, sequence length
OPTIMIZERS = ["adamw", "adam", "adagrad", "sgd", "rmsprop"]  # configs/optimizer/
FUSED = {"adamw", "adam", "adagrad"}  # built with fused=True: they skip on a device flag


def batch(seed: int, poisoned: bool = False) -> list[dict]:
    """One step's micro-batches (one); `poisoned`: its loss is NaN (see NaNLoss)."""
    g = torch.Generator().manual_seed(seed)
    tokens, targets = torch.randint(1, V, (3, T), generator=g), torch.randint(1, V, (3, T), generator=g)
    return [{"tokens": tokens, "targets": targets, "carry": False, "num_tokens": tokens.numel(), "poisoned": poisoned}]


class NaNLoss(LanguageModeling):
    def loss(self, logits, batch):
        out = super().loss(logits, batch)
        return out * float("nan") if batch["poisoned"] else out


def make_trainer(tmp_path, optimizer: str = "adamw", *extra: str) -> Trainer:
    cfg = make_cfg(*TINY["rnn"], "model.dropout=0.0", f"optimizer={optimizer}", "scheduler=constant",
                   "trainer.device=cpu", "trainer.progress=false", "trainer.log_every=5", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, dict(vocab_size=V, num_outputs=V, head="lm", max_len=T))
    return hand_trainer(cfg, model, NaNLoss(), tmp_path, total_steps=100, batches=100)


def snapshot(trainer: Trainer) -> tuple[dict, dict]:
    return copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())


def same(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


class HostReads:
    """Counts reads of a tensor's value into Python (each one a device sync on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counted(original))

    def counted(self, original):
        def read(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)
        return read


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_nonfinite_step_changes_neither_weights_nor_optimizer_state(optimizer, tmp_path):
    """Bit for bit: the bad step leaves weights and optimizer state (moments, step count) as they
    were, so the next good step is the one a run that never saw the bad batch takes."""
    skipping, clean = make_trainer(tmp_path, optimizer, "trainer.nonfinite=skip"), make_trainer(tmp_path, optimizer)
    assert skipping.guard.skips_on_device == (optimizer in FUSED)
    take(skipping, batch(1), batch(2))
    take(clean, batch(1), batch(2))
    before = snapshot(skipping)
    take(skipping, batch(3, poisoned=True))
    assert same(snapshot(skipping), before)
    take(skipping, batch(4))
    take(clean, batch(4))
    assert same(snapshot(skipping)[0], snapshot(clean)[0])
    assert same(snapshot(skipping)[1]["state"], snapshot(clean)[1]["state"])
    skipping.guard.settle()
    assert skipping.guard.skipped == 1 and skipping.p.step == 4


def test_no_host_read_between_log_windows_with_a_fused_optimizer(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "adamw", "trainer.nonfinite=skip", "trainer.ema=0.9")
    take(trainer, batch(0))  # the first step creates the optimizer's state (and reads its verdict)
    reads = HostReads(monkeypatch)
    take(trainer, batch(1), batch(2, poisoned=True), batch(3), batch(4))
    assert reads.count == 0 and trainer.guard.skipped == 0  # not known yet
    bar = SimpleNamespace(n=0, set_postfix_str=lambda *a, **k: None, update=lambda n: None)
    trainer.log_window(bar, 1.0)  # the window's one read: losses and verdicts together
    assert reads.count == 1 and trainer.guard.skipped == 1


def test_an_optimizer_that_cannot_skip_on_the_device_reads_each_verdict(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "rmsprop", "trainer.nonfinite=skip")
    take(trainer, batch(0))
    reads = HostReads(monkeypatch)
    take(trainer, batch(1), batch(2, poisoned=True), batch(3))
    # a verdict read each step, and the bad step's loss and gradient norm: acted on at once
    assert reads.count == 3 + 1 and trainer.guard.skipped == 1


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_stop_policy_stops_with_the_bad_step_and_writes_nothing(optimizer, tmp_path):
    trainer = make_trainer(tmp_path, optimizer)
    take(trainer, batch(0), batch(1))
    before = snapshot(trainer)
    if optimizer in FUSED:  # decided on the device: the run goes on until the host reads
        take(trainer, batch(2, poisoned=True))
        assert same(snapshot(trainer), before)
        take(trainer, batch(3))
        with pytest.raises(NonFiniteError, match=r"non-finite values at step 3 \(loss=nan, grad_norm=nan\); "
                                                 r"weights were not updated"):
            trainer.save()  # a save reads first: nothing is written
        assert not (tmp_path / "checkpoints" / "last.pt").exists()
    else:  # read at the step itself, as it always was
        with pytest.raises(NonFiniteError, match="non-finite values at step 3"):
            take(trainer, batch(2, poisoned=True))
        assert same(snapshot(trainer), before)


def test_skip_resumes_exactly(tmp_path):
    """A skipped step inside the window that a checkpoint closes: resuming from its state
    continues as the uninterrupted run does."""
    steps = [batch(i, poisoned=i in (2, 6)) for i in range(9)]
    whole = make_trainer(tmp_path, "adamw", "trainer.nonfinite=skip", "trainer.ema=0.9")
    take(whole, *steps)
    whole.guard.settle()
    first = make_trainer(tmp_path, "adamw", "trainer.nonfinite=skip", "trainer.ema=0.9")
    take(first, *steps[:4])
    first.guard.settle()  # what save() does first
    state, weights = copy.deepcopy(first.state_dict()), copy.deepcopy(first.model.state_dict())
    ema = first.average.state_dict()
    resumed = make_trainer(tmp_path, "adamw", "trainer.nonfinite=skip", "trainer.ema=0.9")
    resumed.model.load_state_dict(weights)
    resumed.load_state_dict(state)
    resumed.average.load_state_dict(copy.deepcopy(ema))
    take(resumed, *steps[4:])
    resumed.guard.settle()
    assert resumed.guard.skipped == whole.guard.skipped == 2 and resumed.p.step == whole.p.step == 9
    assert same(resumed.model.state_dict(), whole.model.state_dict())
    assert same(resumed.optimizer.state_dict()["state"], whole.optimizer.state_dict()["state"])
    assert same(resumed.average.average, whole.average.average)


def test_fp16_skips_a_nonfinite_loss_through_the_grad_scaler(tmp_path):
    trainer = make_trainer(tmp_path, "adamw", "trainer.nonfinite=skip", "trainer.precision=fp16")
    take(trainer, batch(0))
    before = snapshot(trainer)
    take(trainer, batch(1, poisoned=True))
    assert same(snapshot(trainer)[0], before[0])
    take(trainer, batch(2))  # (the scaler is ready for the next step)
    trainer.guard.settle()
    assert trainer.guard.skipped == 1


def test_a_model_that_does_not_compile_trains_eager_with_one_warning(tmp_path, monkeypatch, caplog):
    class Fails(torch.nn.Module):  # what torch.compile returns: a module, compiled at its first call
        def forward(self, *args):
            raise RuntimeError("backend said no\nmore detail")

    def compile(net):
        return Fails()

    monkeypatch.setattr(torch, "compile", compile)
    trainer = make_trainer(tmp_path, "adamw", "trainer.compile=true")
    before = snapshot(trainer)[0]
    with caplog.at_level(logging.WARNING, logger="seqexp"):
        take(trainer, batch(0), batch(1))  # the first step compiles, and falls back
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert warnings == ["trainer.compile: RecurrentModel does not compile (RuntimeError: backend said no); training eager"]
    assert trainer.update.net is trainer.model and not same(snapshot(trainer)[0], before)  # it trained


def test_a_model_that_compiles_keeps_the_compiled_forward(tmp_path, monkeypatch, caplog):
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args):
            calls.append(1)
            return self.net(*args)

    def compile(net):
        return Compiled(net)

    monkeypatch.setattr(torch, "compile", compile)
    trainer = make_trainer(tmp_path, "adamw", "trainer.compile=true")
    with caplog.at_level(logging.WARNING, logger="seqexp"):
        take(trainer, batch(0))
    assert calls == [1] and trainer.update.net is not trainer.model and not caplog.records
