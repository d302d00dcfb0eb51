"""A dataset states what it can do (data/base.py: `encode`, `examples`, `labels`, `text_encoder`),
and what needs a capability asks for it: a report that cannot run is not run, a command refuses in
one line. Nothing asks which dataset it is."""

from __future__ import annotations

import pytest
import torch

from seqexp.commands import ensemble
from seqexp.data.base import Dataset
from seqexp.data.char import CharData
from seqexp.data.imdb import ImdbData
from seqexp.data.induction import InductionData
from seqexp.data.memory import AddingData, CopyData
from seqexp.reports.base import Context
from seqexp.reports.sample import TextSample
from seqexp.tasks.lm import LanguageModeling
from seqexp.train import train
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_dataset_says_what_it_can_do():
    assert CharData.__new__(CharData).can("encode")  # its vocabulary encodes text
    for cls in (CopyData, AddingData, InductionData):  # generated ids: no text, no fixed labelled examples
        data = cls.__new__(cls)
        assert not data.can("encode") and not data.can("examples") and not data.can("text_encoder")
    imdb = ImdbData.__new__(ImdbData)
    assert imdb.can("examples") and imdb.can("labels") and imdb.can("text_encoder") and not imdb.can("encode")


class Ids(Dataset):
    """A language model's data that reads no text: ids only, no `encode`."""
    task = LanguageModeling()


def test_a_language_model_on_data_that_cannot_encode_text_gets_no_text_sample():
    ctx = Context(model=torch.nn.Linear(1, 1), data=Ids(), logger=None, device=torch.device("cpu"), seed=0,
                  is_main=True, quiet=False, evaluate=None, report=None, best_weights=None)
    assert not TextSample().applies(ctx)  # (a character corpus's data encodes: tests/test_train.py samples it)
    with pytest.raises(Exception, match="does not encode text"):
        Ids().encode("the")


def test_an_ensemble_of_runs_without_fixed_labelled_examples_is_refused_in_one_line(tmp_path, capsys):
    """It used to end in an AttributeError on IMDB's `.offsets` for an adding run."""
    tiny = ["data=adding", "data.length=8", "data.size=64", "data.eval_size=16", "data.batch_size=8",
            "model=gru", "model.hidden_size=8", "model.embed_dim=8", "model.num_layers=1", "trainer.max_steps=2",
            "trainer.eval_every=2", "trainer.progress=false", "trainer.device=cpu", "logging.tensorboard=false"]
    for name in ("a", "b"):
        train(make_cfg(*tiny), tmp_path / name)
    with pytest.raises(SystemExit) as e:
        ensemble.main([str(tmp_path / "a"), str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "fixed, labelled examples" in err, err
