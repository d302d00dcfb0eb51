"""Using trained runs: evaluate, sample and predict on checkpoints of short real runs, and the
TensorBoard figures and texts those runs wrote."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
import torch.serialization
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from seqexp.checkpoint import read as read_checkpoint
from seqexp.commands import evaluate, predict, sample
from seqexp.inference import find_checkpoint, load_run, text_encoder
from seqexp.sampling import generate
from seqexp.train import train
from tests.helpers import ROOT, TINY, built_once, make_cfg, tiny_overrides

TRAINER = ["trainer.max_steps=12", "trainer.eval_every=6", "trainer.log_every=3", "trainer.progress=false",
           "trainer.device=cpu", "scheduler.warmup_steps=2"]


@pytest.fixture(scope="session")  # not "module": xdist interleaves modules, which sets that up again
def runs(tiny_text, tmp_path_factory) -> dict:
    """Three short runs: a recurrent LM (with the gradient-by-distance picture), an attention LM (with
    its attention maps and histograms), an attention classifier (every report at its default).
    The language models are trained once for the session (helpers.built_once: the tests only read
    them); the classifier in each test process, which trusts its toy dataset (tests/toy_classify.py)
    because it built it (seqexp/trust.py)."""
    def build(root):
        train(make_cfg(*tiny_overrides("lstm", tiny_text, "logging.gradient_distance.enabled=true")), root / "lstm")
        train(make_cfg(*tiny_overrides("attention", tiny_text, "logging.attention_maps.enabled=true",
                                       "logging.histograms.enabled=true")), root / "attention")

    shared = built_once(tmp_path_factory, "use-runs", build)
    cfg = make_cfg(*TINY["attention"], *TRAINER)
    with open_dict(cfg):
        cfg.data = {"_target_": "tests.toy_classify.ToySentiment", "batch_size": 8}
    classifier = tmp_path_factory.mktemp("runs") / "classifier"
    train(cfg, classifier)
    return {"lstm": shared / "lstm", "attention": shared / "attention", "classifier": classifier}


def metrics_json(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def exits_with(capsys, main, argv, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("name", ["lstm", "attention", "classifier"])
def test_evaluate_reproduces_the_best_metrics(runs, name, tmp_path, capsys):
    out = tmp_path / "eval.json"
    evaluate.main([str(runs[name]), f"out={out}"])
    result = json.loads(out.read_text())
    best = metrics_json(runs[name])["best"]
    assert result["step"] == metrics_json(runs[name])["best_step"]
    assert result["checkpoint"].endswith("checkpoints/best.pt")
    for key, value in best.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-6), key
    printed = capsys.readouterr().out
    if name == "classifier":
        m = result["metrics"]
        assert m["val/tn"] + m["val/fp"] + m["val/fn"] + m["val/tp"] == m["val/count"] == 40
        assert m["val/confusion"] == [[m["val/tn"], m["val/fp"]], [m["val/fn"], m["val/tp"]]]
        assert "val/acc" in printed
    else:
        assert f"val/bpc     {best['val/bpc']:.4f}" in printed
    # without out=, the JSON lands in the run directory (a copy: the runs are shared, only read)
    run = shutil.copytree(runs[name], tmp_path / "run")
    evaluate.main([str(run / "checkpoints" / "last.pt")])
    assert (run / "eval_val_last.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_written_on_cuda_evaluates_on_the_cpu(runs, tmp_path, monkeypatch):
    ckpt = read_checkpoint(runs["lstm"] / "checkpoints" / "best.pt")
    # save as a CUDA process would: every storage tagged with device cuda:0
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, tmp_path / "cuda.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "cuda.pt", weights_only=True)  # what loading without a map would do
    evaluate.main([str(tmp_path / "cuda.pt"), f"out={tmp_path / 'e.json'}"])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metrics"]["val/loss"] == pytest.approx(metrics_json(runs["lstm"])["best"]["val/loss"], rel=1e-6)


def test_evaluate_data_overrides_and_errors(runs, tiny_text, tmp_path, capsys):
    run = str(runs["lstm"])
    moved = tmp_path / "moved.txt"
    shutil.copy(tiny_text, moved)
    evaluate.main([run, f"data.path={moved}", f"out={tmp_path / 'e.json'}"])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["data"] == str(moved)
    assert result["metrics"]["val/loss"] == pytest.approx(metrics_json(runs["lstm"])["best"]["val/loss"], rel=1e-6)
    capsys.readouterr()
    err = exits_with(capsys, evaluate.main, [run, f"data.path={tmp_path / 'gone.txt'}"])
    assert "no such file" in err and "data.path=" in err
    assert "'data.nope' is not a key" in exits_with(capsys, evaluate.main, [run, "data.nope=1"])
    assert "no 'test' split; choose split=train or split=val" in exits_with(capsys, evaluate.main, [run, "split=test"])
    assert "give one run directory" in exits_with(capsys, evaluate.main, [])


def test_run_directories_resolve_to_best_then_last(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs["lstm"], copy)
    assert find_checkpoint(copy) == copy / "checkpoints" / "best.pt"
    (copy / "checkpoints" / "best.pt").unlink()
    assert find_checkpoint(copy) == copy / "checkpoints" / "last.pt"
    assert find_checkpoint(copy / "checkpoints") == copy / "checkpoints" / "last.pt"


# ----------------------------------------------------------------------------- sample
class Recorder(io.StringIO):
    """stdout stand-in that remembers how much text had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed_at = []

    def flush(self):
        self.flushed_at.append(len(self.getvalue()))


def test_sample_streams_each_character_as_it_is_generated(runs):
    opts = sample.Options(prompt="the ", length=30, seed=3)
    out = Recorder()
    [text] = sample.sample(str(runs["lstm"]), opts, out)
    assert out.getvalue() == text + "\n" and text.startswith("the ") and len(text) == 4 + 30
    # a flush after the prompt and after every generated character
    assert sorted(set(out.flushed_at))[:31] == list(range(4, 35))
    # the same seed gives the same text; the tokens are what `generate` gives for that seed
    again = sample.sample(str(runs["lstm"]), opts, io.StringIO())
    assert again == [text]
    run = load_run(runs["lstm"])
    enc = text_encoder(run.ckpt)
    ids = [int(t) for t in generate(run.model, enc.encode("the ")[None], 30, temperature=0.8, top_k=40,
                                    generator=torch.Generator().manual_seed(3))]
    assert text == "the " + enc.decode(ids)


def test_sample_greedy_and_several_samples_from_an_attention_model(runs):
    prompt = "the of and to in is was that for"  # longer than the context (16): the window slides
    out = io.StringIO()
    texts = sample.sample(str(runs["attention"]), sample.Options(prompt=prompt, length=25, num_samples=3, seed=0), out)
    assert len(texts) == 3 and all(t.startswith(prompt) and len(t) == len(prompt) + 25 for t in texts)
    assert out.getvalue().count("--- sample ") == 3 and texts[2] in out.getvalue()
    assert len(set(texts)) > 1  # independent draws
    greedy = sample.sample(str(runs["attention"]), sample.Options(prompt=prompt, length=25, num_samples=2,
                                                                  greedy=True, seed=5), io.StringIO())
    assert greedy[0] == greedy[1]


@pytest.mark.slow
def test_sample_script_streams_to_stdout(runs):
    """The real entry point: a subprocess, as a user runs it."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(runs["lstm"]),
                        "prompt=the ", "length=30", "seed=3"],
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    expected = sample.sample(str(runs["lstm"]), sample.Options(prompt="the ", length=30, seed=3), io.StringIO())
    assert r.stdout == expected[0] + "\n"


@pytest.mark.parametrize("run, argv, message", [
    ("classifier", [], "is a classifier; sampling needs a language model"),
    ("lstm", ["prompt="], "prompt is empty"),
    ("lstm", ["prompt=the Quiz"], "never saw in training: 'Q' 'z'"),
    ("lstm", ["temperature=0"], "temperature must be > 0"),
    (None, [], "holds no checkpoint"),
])
def test_sample_errors(runs, run, argv, message, tmp_path, capsys):
    path = runs[run] if run else tmp_path
    assert message in exits_with(capsys, sample.main, [str(path), *argv])


# ----------------------------------------------------------------------------- predict
def test_predict_labels_texts_from_arguments_file_and_stdin(runs, tmp_path, capsys, monkeypatch):
    texts = ["the film was good", "awful plot", "it is fine and nice", "é=unknown characters"]
    run = load_run(runs["classifier"])
    expected = []
    enc = text_encoder(run.ckpt)
    for t in texts:  # one at a time, unpadded: batching and padding must not change the answer
        with torch.no_grad():
            probs = torch.softmax(run.model(enc.encode(t)[None], torch.tensor([len(t)]))[0], -1)[0]
        expected.append(f"{['neg', 'pos'][int(probs.argmax())]}\t{float(probs.max()):.4f}")

    predict.main([str(runs["classifier"]), "batch_size=2", *texts[:3], "--", texts[3]])  # '=' in text 4
    assert capsys.readouterr().out.splitlines() == expected
    (tmp_path / "reviews.txt").write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    predict.main([str(runs["classifier"]), f"file={tmp_path / 'reviews.txt'}"])
    assert capsys.readouterr().out.splitlines() == expected  # the blank line is skipped
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts)))
    predict.main([str(runs["classifier"])])
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.slow
def test_predict_errors(runs, tmp_path, capsys):
    assert "is a language model; prediction needs a classifier" in exits_with(
        capsys, predict.main, [str(runs["lstm"]), "great"])
    assert "cannot read it" in exits_with(capsys, predict.main, [str(runs["classifier"]), f"file={tmp_path / 'no.txt'}"])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), str(runs["lstm"]), "great"],
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1


def test_unknown_data_kind_has_no_text_encoder(runs):
    from seqexp.errors import UserError
    ckpt = read_checkpoint(runs["classifier"] / "checkpoints" / "best.pt")
    ckpt["data"] = {"kind": "imdb-v9"}
    with pytest.raises(UserError, match="cannot encode text for data kind 'imdb-v9'"):
        text_encoder(ckpt)


def test_console_scripts_are_installed_entry_points():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"seqexp-train", "seqexp-evaluate", "seqexp-sample", "seqexp-predict", "seqexp-ensemble",
                            "seqexp-lr-find"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), name
        if name != "seqexp-train":
            assert (ROOT / "scripts" / f"{name.removeprefix('seqexp-').replace('-', '_')}.py").is_file()


# ----------------------------------------------------------------------------- TensorBoard
def events(run) -> EventAccumulator:
    return EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "tensors": 0}).Reload()


def test_attention_maps_and_histograms_in_the_event_file(runs):
    ea = events(runs["attention"])
    for layer in (0, 1):  # TINY attention: 2 layers
        images = ea.Images(f"attention/layer{layer}")
        assert [i.step for i in images] == [6, 12]
        assert images[0].width > images[0].height > 100
        assert images[0].encoded_image_string.startswith(b"\x89PNG")
    hist = ea.Tags()["histograms"]
    assert "weights/blocks.0.attn.qkv.weight" in hist and "grads/blocks.0.attn.qkv.weight" in hist
    assert [h.step for h in ea.Histograms("grads/tok_emb.weight")] == [6, 12]
    lstm = events(runs["lstm"]).Tags()
    # no attention maps, only the gradient-by-distance picture; histograms off by default
    assert lstm["images"] == ["gradient_distance/plot"] and lstm["histograms"] == []


def test_classifier_writes_its_most_confidently_wrong_examples(runs):
    ea = events(runs["classifier"])
    assert "attention/layer0" in ea.Tags()["images"]  # padded examples draw too
    texts = [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in ea.Tensors("wrong/text_summary")]
    assert len(texts) == 2
    m = metrics_json(runs["classifier"])["final"]
    wrong = m["val/fp"] + m["val/fn"]
    assert wrong > 0  # 12 steps do not make it perfect (the run is deterministic)
    assert texts[-1].startswith(f"    {wrong} of 40 wrong; the 5 most confident:")
    assert texts[-1].count("predicted") == min(5, wrong)


def env() -> dict:
    """Subprocesses import this checkout's seqexp, and `tests` for the toy dataset."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def test_predict_on_an_imdb_run_encodes_reviews_as_training_did(tmp_path, capsys):
    """A raw review through predict.py gets the probabilities the model gives the same review
    through the training pipeline (tokenizer, vocabulary, head+tail truncation, padding)."""
    from tests.helpers import imdb_overrides, synthetic_reviews, write_archive

    review = ("An <b>AWFUL</b>, boring film!<br /><br />" + " the plot was dull" * 30 + " but the actor was great.")
    files = synthetic_reviews(n_test=0)
    files["aclImdb/test/neg/0_1.txt"] = review.encode()  # longer than max_len
    files["aclImdb/test/pos/0_9.txt"] = b"Great!"  # the layout needs both classes
    archive = write_archive(tmp_path / "one_test_review.tar.gz", files)
    run = tmp_path / "run"
    train(make_cfg(*imdb_overrides("lstm", archive, tmp_path / "cache", "data.max_len=32")), run)
    loaded = load_run(run)
    data = instantiate_run_data(loaded)
    batch = next(data.batches("test"))  # both test reviews, shortest first
    assert batch["lengths"].tolist() == [2, 32]  # "great", "!"; the long one truncated in training too
    with torch.no_grad():
        probs = torch.softmax(loaded.model(batch["tokens"], batch["lengths"])[0], -1)[1]
    assert torch.equal(text_encoder(loaded.ckpt).encode(review), batch["tokens"][1])
    predict.main([str(run), "--", review])
    label, p = capsys.readouterr().out.strip().split("\t")
    assert label == ["neg", "pos"][int(probs.argmax())] and float(p) == pytest.approx(float(probs.max()), abs=1e-4)


def instantiate_run_data(run):
    from seqexp.inference import build_data
    return build_data(run.ckpt)
