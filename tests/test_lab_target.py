"""The memory lab trains to a target (data_defaults/lab.yaml: val/exact 0.99, or a cap of
steps): a tiny attention model with the short convolution of Zoology/Based solves a tiny recall
task in a few hundred steps and stops there; without the convolution it does not (issue #32)."""

from __future__ import annotations

import pytest

from seqexp.configs import CONFIG_DIR
from seqexp.train import train
from tests.helpers import make_cfg

# every task of the lab: a data_defaults file that includes lab.yaml
LAB_TASKS = sorted(p.stem for p in (CONFIG_DIR / "data_defaults").glob("*.yaml")
                   if "- lab" in (line.strip() for line in p.read_text().splitlines()))

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 pairs over 8 keys in 16 positions; a fresh sample every epoch of 32 batches
TINY_RECALL = ["data=recall", "data.length=16", "data.num_pairs=4", "data.alphabet=8", "data.batch_size=32",
               "data.size=1024", "data.fresh=true", "data.eval_size=200", "model=attention", "model.d_model=32",
               "model.n_heads=2", "model.n_layers=2", "optimizer.lr=3e-3", "scheduler.warmup_steps=20",
               "trainer.max_steps=600", "trainer.eval_every=50", "trainer.progress=false", "trainer.device=cpu",
               "logging.tensorboard=false"]


@pytest.mark.slow  # trains to the target: hundreds of steps
def test_attention_with_a_convolution_solves_tiny_recall_and_stops_at_the_target(tmp_path):
    m = train(make_cfg(*TINY_RECALL, "model.conv_kernel=4"), tmp_path / "run")
    target = m["target"]
    assert target["metric"] == "val/exact" and target["value"] == 0.99 and target["reached"]
    assert m["steps"] == target["step"] < 600  # stopped at the evaluation that reached it
    assert m["best"]["val/exact"] >= 0.99 and m["test"]["test/exact"] >= 0.95


@pytest.mark.slow  # the whole budget: 600 steps
def test_without_the_convolution_the_same_budget_is_not_enough(tmp_path):
    m = train(make_cfg(*TINY_RECALL), tmp_path / "run")
    assert not m["target"]["reached"] and m["steps"] == 600 and m["best"]["val/exact"] < 0.5


@pytest.mark.parametrize("data", LAB_TASKS)
def test_every_lab_task_trains_to_the_target_with_its_own_cap(data):
    t = make_cfg(f"data={data}").trainer
    assert t.target == 0.99 and t.monitor == ("val/acc" if data == "adding" else "val/exact")
    assert 1000 <= t.max_steps <= 3000 and t.eval_every == 100 and t.keep_last == 0
    assert make_cfg(f"data={data}", "~data_defaults").trainer.target is None  # a plain run, when asked


def test_the_lab_is_the_five_memory_tasks():
    assert LAB_TASKS == ["adding", "copy", "induction", "recall", "selective_copy"]
