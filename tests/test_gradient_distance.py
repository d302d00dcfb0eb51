"""The gradient-by-distance picture (seqexp/gradients.py, its report reports/gradient_distance.py):
exact zeros where the answer cannot depend on an input, padding that never moves or joins the
curve, an RNN that forgets where attention does not, the picture in TensorBoard, and training
left exactly as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.build import build_data, build_model
from seqexp.configs import CONFIG_DIR
from seqexp.config import validate
from seqexp.errors import UserError
from seqexp.gradients import add, by_distance, fixed_rows, input_gradient_norms, mean, measure
from seqexp.models.attention import AttentionModel
from seqexp.models.ngram import NgramModel
from seqexp.models.recurrent import RecurrentModel
from seqexp.reports.base import Context
from seqexp.reports.gradient_distance import GradientDistance
from seqexp.tasks.answer import AnswerPositions
from seqexp.tasks.base import IGNORE
from seqexp.tasks.classify import Classification
from seqexp.tasks.lm import LanguageModeling
from seqexp.train import train
from tests.helpers import EXTENSION, SEARCH, final_state, lm_capable, make_cfg, same_tensors, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
QUICK = ["trainer.progress=false", "trainer.device=cpu"]


def lm_batch(B: int, T: int, last: int) -> dict:
    """Random tokens; targets up to position `last`, IGNORE after (as a padded eval row)."""
    tokens = torch.randint(1, V, (B, T))
    targets = torch.randint(1, V, (B, T))
    targets[:, last + 1:] = IGNORE
    return {"tokens": tokens, "targets": targets}


# ----------------------------------------------------------------------------- exact zeros
@pytest.mark.parametrize("window", [2, 5])
def test_one_window_layer_has_exactly_zero_gradient_beyond_its_window_and_after_the_answer(window):
    torch.manual_seed(0)
    T, last = 32, 24
    model = AttentionModel(vocab_size=V, num_outputs=V, head="lm", max_len=T, d_model=16, n_heads=2, n_layers=1,
                           window=window)
    norms, anchor = input_gradient_norms(model, LanguageModeling(), lm_batch(3, T, last))
    assert anchor.tolist() == [last] * 3  # the last position with a target
    assert (norms[:, : last - window] == 0.0).all()  # beyond the window: exactly zero
    assert (norms[:, last - window: last + 1] > 0).all()  # within it: the answer reads them
    assert (norms[:, last + 1:] == 0.0).all()  # causal: nothing after the answer
    sums, counts = by_distance(norms, anchor)
    assert counts[: last + 1].tolist() == [3] * (last + 1) and counts[last + 1:].sum() == 0  # d >= 0 only
    assert (sums[window + 1:] == 0.0).all() and (sums[: window + 1] > 0).all()


def test_a_causal_recurrent_lm_has_exactly_zero_gradient_after_the_answer():
    torch.manual_seed(0)
    model = RecurrentModel(vocab_size=V, num_outputs=V, head="lm", cell="lstm", embed_dim=8, hidden_size=16,
                           num_layers=2, dropout=0.3)
    norms, anchor = input_gradient_norms(model, LanguageModeling(), lm_batch(2, 20, 12))
    assert (norms[:, 13:] == 0.0).all() and (norms[:, :13] > 0).all()
    assert model.training  # its mode is given back


def test_the_lab_anchor_is_the_first_answer_position():
    y = torch.full((2, 10), IGNORE)
    y[0, 6:9], y[1, 4] = 3, 5  # row 0 answers at 6..8, row 1 at 4
    logits = torch.randn(2, 10, V)
    loss, anchor = AnswerPositions().answer_loss(logits, {"tokens": torch.zeros(2, 10, dtype=torch.long),
                                                          "targets": y})
    assert anchor.tolist() == [6, 4]
    ce = torch.nn.functional.cross_entropy(logits[0, 6:9], y[0, 6:9])
    assert loss[0] == pytest.approx(float(ce))  # the mean over the row's answers


# ----------------------------------------------------------------------------- padding
def classifiers():
    torch.manual_seed(0)
    yield AttentionModel(vocab_size=V, num_outputs=2, head="classify", max_len=40, d_model=16, n_heads=2,
                         n_layers=2, conv_kernel=3)
    yield RecurrentModel(vocab_size=V, num_outputs=2, head="classify", cell="gru", embed_dim=8, hidden_size=16,
                         num_layers=2, bidirectional=True, pooling="mean")


@pytest.mark.parametrize("model", list(classifiers()), ids=["attention", "bigru"])
def test_a_review_gives_the_same_curve_alone_or_padded_in_a_batch(model):
    torch.manual_seed(1)
    lengths = [7, 19, 12]
    reviews = [torch.randint(1, V, (n,)) for n in lengths]
    labels = torch.tensor([0, 1, 1])
    alone = None
    for review, label in zip(reviews, labels):
        batch = {"tokens": review[None], "targets": label[None], "lengths": torch.tensor([len(review)])}
        alone = add(alone, by_distance(*input_gradient_norms(model, Classification(), batch)))
    T = 30  # longer than every review: every row padded
    tokens = torch.zeros(len(reviews), T, dtype=torch.long)
    for i, review in enumerate(reviews):
        tokens[i, : len(review)] = review
    batch = {"tokens": tokens, "targets": labels, "lengths": torch.tensor(lengths)}
    sums, counts = by_distance(*input_gradient_norms(model, Classification(), batch))
    assert counts.sum() == sum(lengths)  # the padded positions are never counted
    assert counts[:19].tolist() == alone[1].tolist() and counts[19:].sum() == 0
    torch.testing.assert_close(sums[:19], alone[0], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- the picture's point
def test_a_vanilla_rnn_forgets_with_distance_at_init_and_attention_does_not():
    T = 64
    torch.manual_seed(0)
    rnn = RecurrentModel(vocab_size=V, num_outputs=V, head="lm", cell="rnn", embed_dim=16, hidden_size=32,
                         num_layers=1)
    attention = AttentionModel(vocab_size=V, num_outputs=V, head="lm", max_len=T, d_model=32, n_heads=2,
                               n_layers=2)
    batch = lm_batch(16, T, T - 1)
    far = slice(32, 64)
    curve = {}
    for name, model in (("rnn", rnn), ("attention", attention)):
        norms = mean(*by_distance(*input_gradient_norms(model, LanguageModeling(), batch)))
        curve[name] = float(norms[far].mean()) / float(norms[1:5].mean())  # far / near
    assert curve["rnn"] < 1e-4, curve  # tanh recurrence at init: geometric decay
    assert curve["attention"] > 0.1, curve  # one attention step reaches any position


# ----------------------------------------------------------------------------- every family
# every model config, shipped or found through the search path, that models language (the copy
# task answers at positions): its own check_config says so
LM_MODELS = [n for n in sorted({p.stem for d in (CONFIG_DIR, EXTENSION / "configs") for p in (d / "model").glob("*.yaml")})
             if lm_capable(n, SEARCH)]


@pytest.mark.parametrize("name", LM_MODELS)
def test_every_family_exposes_its_input_and_leaves_no_gradient_on_parameters(name):
    cfg = make_cfg(SEARCH, "data=copy", "data.length=6", "data.num_symbols=2", "data.size=16", "data.eval_size=24",
                   "data.batch_size=8", f"model={name}")
    validate(cfg)
    data = build_data(cfg.data, seed=0)
    model = build_model(cfg.model, data.model_kwargs())
    batches = fixed_rows(data, 12)
    assert sum(len(b["tokens"]) for b in batches) == 12  # every other row: 12 of 24, in two batches
    sums, counts = measure(model, data.task, batches, torch.device("cpu"))
    assert counts[0] == 12 and torch.isfinite(sums).all() and sums[0] > 0
    assert all(p.grad is None for p in model.parameters())


def test_a_model_without_per_position_inputs_is_skipped_in_one_info_line(caplog):
    cfg = make_cfg("logging.gradient_distance.enabled=true")
    model = NgramModel(vocab_size=V, num_outputs=2, head="classify")
    ctx = Context(model=model, data=None, logger=SimpleNamespace(enabled=True), device=torch.device("cpu"), seed=0,
                  is_main=True, quiet=False, evaluate=None, report=None, best_weights=None)
    with caplog.at_level(logging.INFO, logger="seqexp"):
        assert not GradientDistance(**cfg.logging.gradient_distance).applies(ctx)
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "NgramModel" in caplog.records[0].getMessage()


def test_gradient_rows_below_one_is_refused_before_any_data():
    with pytest.raises(UserError, match="logging.gradient_distance.rows"):
        validate(make_cfg("logging.gradient_distance.rows=0"))


# ----------------------------------------------------------------------------- in a run
def lab(*extra: str) -> list[str]:
    return ["data=recall", "data.length=24", "data.num_pairs=4", "data.size=64", "data.eval_size=32",
            "data.batch_size=8", "trainer.max_steps=10", "trainer.eval_every=5", "trainer.checkpoint_every=5",
            "trainer.log_every=5", "scheduler.warmup_steps=2", *QUICK, *extra]


def test_a_run_logs_the_picture_and_scalars_at_each_evaluation(tmp_path: Path, tiny_text):
    runs = {"lab": (tmp_path / "lab", lab("model=attention", "model.d_model=16", "model.n_heads=2",
                                          "model.n_layers=1", "logging.attention_maps.enabled=false")),
            "lm": (tmp_path / "lm", tiny_overrides("lstm", tiny_text, "logging.gradient_distance.enabled=true"))}
    for name, (run, overrides) in runs.items():
        train(make_cfg(*overrides), run)
        events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
        evals = [5, 10] if name == "lab" else [6, 12]
        assert [e.step for e in events.Images("gradient_distance/plot")] == evals, name
        for d in (1, 4):  # within range (recall: up to 23 back; char windows: up to 15)
            values = events.Scalars(f"gradient_distance/{d}")
            assert [e.step for e in values] == evals and all(e.value > 0 for e in values), (name, d)
        assert "gradient_distance/64" not in events.Tags()["scalars"]  # beyond every sequence


@pytest.mark.parametrize("model", [["model=lstm", "model.hidden_size=16", "model.embed_dim=8", "model.dropout=0.2"],
                                   ["model=attention", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
                                    "model.dropout=0.2"]], ids=["lstm", "attention"])
def test_the_picture_changes_nothing_in_training(tmp_path: Path, model):
    on, off = tmp_path / "on", tmp_path / "off"
    train(make_cfg(*lab(*model, "logging.gradient_distance.enabled=true")), on)
    train(make_cfg(*lab(*model, "logging.gradient_distance.enabled=false")), off)
    assert "gradient_distance/plot" in EventAccumulator(str(on)).Reload().Tags()["images"]
    assert same_tensors(final_state(on), final_state(off)), "weights or optimizer state differ"
