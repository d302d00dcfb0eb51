"""IMDB pipeline on small aclImdb-layout archives generated here: download, safe extraction,
tokenizer, cache, splits, vocabulary, truncation, bucketing, padding invariance, end-to-end runs."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import seqexp.data.imdb as imdb
from seqexp.build import instantiate
from seqexp.checkpoint import read as read_checkpoint
from seqexp.configs import CONFIG_DIR
from seqexp.config import validate
from seqexp.data.imdb import VAL_BLOCK, ImdbData, encode_text, validation_split
from seqexp.data.text import PAD, PAD_ID, UNK, UNK_ID, tokenize
from seqexp.errors import UserError
from seqexp.tasks.classify import Classification
from seqexp.train import train
from tests.helpers import TINY, imdb_overrides, make_cfg, synthetic_reviews, write_archive

@pytest.fixture(scope="session")
def archive(imdb_archive) -> Path:
    return imdb_archive


def data(archive_path, cache, **kw) -> ImdbData:
    return ImdbData(seed=kw.pop("seed", 0), path=str(archive_path), cache_dir=str(cache), **kw)


def words(d: ImdbData, batch: dict, row: int) -> list[str]:
    n = int(batch["lengths"][row])
    return [d.itos[i] for i in batch["tokens"][row, :n].tolist()]


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_handles_markup_case_punctuation_and_apostrophes():
    assert tokenize("Great movie!<br /><br />I didn't LIKE the end...") == \
        ["great", "movie", "!", "i", "didn't", "like", "the", "end", ".", ".", "."]
    assert tokenize("It's 10/10 :)", lowercase=False) == ["It's", "10", "/", "10", ":", ")"]
    assert tokenize("café\ufffdnoir") == ["café", "noir"]  # U+FFFD (invalid UTF-8) separates, is no token


def test_invalid_utf8_is_replaced_and_reported(tmp_path, caplog):
    files = synthetic_reviews(4, 2)
    files["aclImdb/train/pos/99_10.txt"] = b"Zzgood \xff\xfe zzfilm"
    arc = write_archive(tmp_path / "a.tar.gz", files)
    with caplog.at_level(logging.WARNING, logger="seqexp"):
        d = data(arc, tmp_path / "cache", min_freq=1, val_fraction=0.25)
    assert "1 review(s) are not valid UTF-8" in caplog.text and "train/pos/99_10.txt" in caplog.text
    found = [words(d, b, r) for split in ("train", "val") for b in d.batches(split) for r in range(len(b["lengths"]))]
    assert ["zzgood", "zzfilm"] in found  # the invalid bytes are gone, the words around them kept


# ----------------------------------------------------------------------------- sources and extraction
def test_archive_gives_labelled_reviews_only_and_writes_just_the_cache(archive, tmp_path):
    d = data(archive, tmp_path)
    assert [p.name for p in (tmp_path / "imdb").iterdir()] == [next((tmp_path / "imdb").glob("tokens-*.pt")).name]
    assert len(d.splits["test"]) == 24 and len(d.splits["train"]) + len(d.splits["val"]) == 48  # no unsup/


def test_extracted_directory_gives_the_same_data_as_the_archive(archive, tmp_path):
    a = data(archive, tmp_path / "c1")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    directory = tmp_path / "x" / "aclImdb"
    b = data(directory, tmp_path / "c2")
    c = data(directory.parent, tmp_path / "c3")  # the parent of aclImdb/ works too
    for other in (b, c):
        assert other.itos == a.itos
        for split in ("train", "val", "test"):
            for x, y in zip(a.batches(split), other.batches(split)):
                assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["targets"], y["targets"])


def member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("bad,why", [
    (member("../evil.txt", tarfile.REGTYPE), "'..'"),
    (member("aclImdb/train/pos/../../../evil.txt", tarfile.REGTYPE), "'..'"),
    (member("/tmp/evil.txt", tarfile.REGTYPE), "absolute"),
    (member("aclImdb/train/pos/link.txt", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (member("aclImdb/train/pos/hard.txt", tarfile.LNKTYPE, "aclImdb/README"), "link"),
    (member("aclImdb/train/pos/dev.txt", tarfile.CHRTYPE), "device"),
    (member("aclImdb/train/pos/fifo.txt", tarfile.FIFOTYPE), "device"),
])
def test_malicious_members_are_rejected(bad, why, tmp_path):
    arc = write_archive(tmp_path / "evil.tar.gz", synthetic_reviews(2, 1), extra=[bad])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=rf"refusing archive member '{bad.name}' \(.*{why}"):
        data(arc, cache)
    left = sorted(p.name for p in (cache / "imdb").iterdir()) if (cache / "imdb").exists() else []
    assert left == []  # no cache of a refused archive
    assert not (tmp_path / "evil.txt").exists()


def test_not_an_aclimdb_archive_is_a_clear_error(archive, tmp_path):
    no_test = {k: v for k, v in synthetic_reviews(2, 1).items() if "/test/neg/" not in k}
    with pytest.raises(UserError, match="no reviews under aclImdb/test/neg"):
        data(write_archive(tmp_path / "a.tar.gz", no_test), tmp_path / "c")
    assert not (tmp_path / "c" / "imdb").exists() or not list((tmp_path / "c" / "imdb").iterdir())
    (tmp_path / "garbage.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip" * 10)
    with pytest.raises(UserError, match="could not read"):
        data(tmp_path / "garbage.tar.gz", tmp_path / "c")
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="could not read"):
        data(tmp_path / "cut.tar.gz", tmp_path / "c")
    with pytest.raises(UserError, match="no such file"):
        data(tmp_path / "missing.tar.gz", tmp_path / "c")


@pytest.fixture
def server(archive):
    """Serves /good (the archive), /tampered (one byte changed) and /truncated (half of it)."""
    payload = archive.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/good": payload, "/tampered": payload[:100] + bytes([payload[100] ^ 1]) + payload[101:],
                    "/truncated": payload[: len(payload) // 2]}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()  # shutdown() waits a poll
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(payload).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def test_download_good_tampered_truncated(server, tmp_path):
    base, sha = server
    d = ImdbData(seed=0, url=f"{base}/good", sha256=sha, cache_dir=str(tmp_path / "ok"))
    assert len(d.splits["test"]) == 24
    assert (tmp_path / "ok" / "imdb" / "good").read_bytes()[:2] == b"\x1f\x8b"  # kept, verified
    for bad in ("tampered", "truncated"):
        cache = tmp_path / bad
        with pytest.raises(UserError, match="checksum mismatch|cut off"):
            ImdbData(seed=0, url=f"{base}/{bad}", sha256=sha, cache_dir=str(cache))
        assert sorted(p.name for p in (cache / "imdb").iterdir()) == []  # nothing that looks complete


def test_offline_without_a_local_copy_names_the_url_and_data_path(tmp_path):
    with pytest.raises(UserError, match=r"http://127\.0\.0\.1:9/aclImdb_v1\.tar\.gz.*data\.path"):
        ImdbData(seed=0, url="http://127.0.0.1:9/aclImdb_v1.tar.gz", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- cache
def test_second_run_reads_the_cache_without_tokenizing(archive, tmp_path, monkeypatch):
    first = data(archive, tmp_path)
    assert len(list((tmp_path / "imdb").glob("tokens-*.pt"))) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized although a cache matches")

    monkeypatch.setattr(imdb, "build_corpus", no_tokenizing)
    second = data(archive, tmp_path, max_vocab=10, min_freq=1)  # vocabulary settings: same cache
    assert second.vocab_size == 12 and first.vocab_size > 12
    again = data(archive, tmp_path)
    assert again.itos == first.itos
    for x, y in zip(first.batches("train", epoch=1), again.batches("train", epoch=1)):
        assert torch.equal(x["tokens"], y["tokens"])
    with pytest.raises(AssertionError, match="tokenized"):  # another tokenizer setting: another key
        data(archive, tmp_path, lowercase=False)


def test_cache_is_keyed_by_archive_content(archive, tmp_path):
    data(archive, tmp_path)
    other = write_archive(tmp_path / "other.tar.gz", synthetic_reviews(seed=1))
    data(other, tmp_path)
    assert len(list((tmp_path / "imdb").glob("tokens-*.pt"))) == 2



def test_a_new_cache_format_retokenizes_but_keeps_the_fingerprint(archive, tmp_path, monkeypatch):
    """Checkpoints compare fingerprints at resume and in ensembles: changing how the cache is laid
    out must not turn the same reviews into "other data"."""
    before = data(archive, tmp_path)
    monkeypatch.setattr(imdb, "CACHE_FORMAT", "seqexp-imdb-tokens/test-next")
    after = data(archive, tmp_path)
    assert len(list((tmp_path / "imdb").glob("tokens-*.pt"))) == 2  # a new cache file was written
    assert after.state()["fingerprint"] == before.state()["fingerprint"]
    other = write_archive(tmp_path / "other.tar.gz", synthetic_reviews(seed=1))
    assert data(other, tmp_path).state()["fingerprint"] != before.state()["fingerprint"]
    assert data(archive, tmp_path, lowercase=False).state()["fingerprint"] != before.state()["fingerprint"]

# ----------------------------------------------------------------------------- splits and vocabulary
def test_vocabulary_comes_from_training_reviews_only(tmp_path):
    files = synthetic_reviews(10, 5)
    for i, name in enumerate(n for n in list(files) if "/train/" in n):
        files[name] += f" uniq{i}".encode()  # one word per training review
    for name in (n for n in list(files) if "/test/" in n):
        files[name] += b" testonly"
    d = data(write_archive(tmp_path / "a.tar.gz", files), tmp_path, min_freq=1, val_fraction=0.2)
    assert d.itos[PAD_ID] == PAD and d.itos[UNK_ID] == UNK
    assert "testonly" not in d.itos
    # a review's own word is in the vocabulary exactly when the review trains (validation held out)
    assert sum(w.startswith("uniq") for w in d.itos) == len(d.splits["train"]) == 16
    small = data(write_archive(tmp_path / "a.tar.gz", files), tmp_path, max_vocab=5, min_freq=1)
    assert small.vocab_size == 7
    rare = data(write_archive(tmp_path / "a.tar.gz", files), tmp_path, min_freq=2)
    assert not any(w.startswith("uniq") for w in rare.itos)


@pytest.mark.parametrize("val_split", ["contiguous", "random"])
def test_validation_split_is_stratified_and_seeded(archive, tmp_path, val_split):
    def split_ids(seed):
        d = data(archive, tmp_path, seed=seed, val_fraction=0.25, val_split=val_split)
        return {k: set(d.splits[k].offsets.tolist()) for k in ("train", "val")}, d

    a, d = split_ids(0)
    assert a == split_ids(0)[0] and a != split_ids(1)[0]
    assert not a["train"] & a["val"] and len(a["train"] | a["val"]) == 48
    assert d.splits["val"].labels.bincount().tolist() == [6, 6]  # 25% of each class


def test_contiguous_validation_holds_out_whole_movies():
    """aclImdb numbers a movie's reviews of one class consecutively. Here movies of 1-30 reviews
    (as in aclImdb), numbered in runs, file order shuffled: a contiguous split puts few (movie,
    class) groups on both sides -- only those on a block's edge -- a random one splits most."""
    g = torch.Generator().manual_seed(0)
    movie = torch.cat([torch.full((int(n),), m) for m, n in enumerate(torch.randint(1, 31, (800,), generator=g))])
    R = len(movie)
    order = torch.randperm(R, generator=g)  # the order reviews are stored in is not the id order
    numbers, movie = order, movie[order]  # review i has id numbers[i] and belongs to movie[i]
    labels = torch.randint(2, (R,), generator=g)
    group = movie * 2 + labels  # (movie, class)

    def shared(val: torch.Tensor) -> float:  # share of validation groups with reviews in training too
        held, seen = set(group[val].tolist()), set(group[~val].tolist())
        return len(held & seen) / len(held)

    for seed in range(3):
        val = validation_split(labels, numbers, 0.1, seed, contiguous=True)
        for c in (0, 1):  # stratified: 10% of each class
            assert val[labels == c].sum() == round(int((labels == c).sum()) * 0.1)
        blocks = -(-int(val.sum()) // VAL_BLOCK) + 2  # whole blocks; per class one partly taken
        assert shared(val) <= 2 * blocks / len(set(group[val].tolist())) + 1e-9
        assert shared(validation_split(labels, numbers, 0.1, seed, contiguous=False)) > 0.5
    assert not torch.equal(validation_split(labels, numbers, 0.1, 0, contiguous=True),
                           validation_split(labels, numbers, 0.1, 1, contiguous=True))


@pytest.mark.parametrize("policy,expected", [
    ("head", [f"w{i}" for i in range(8)]),
    ("tail", [f"w{i}" for i in range(12, 20)]),
    ("head+tail", ["w0", "w1"] + [f"w{i}" for i in range(14, 20)]),  # a quarter from the start
])
def test_truncation_policies(policy, expected, tmp_path):
    files = synthetic_reviews(4, 2)
    files["aclImdb/test/pos/77_9.txt"] = " ".join(f"w{i}" for i in range(20)).encode()
    for i in range(3):  # its words in training reviews, so in the vocabulary
        files[f"aclImdb/train/pos/7{i}_9.txt"] = files["aclImdb/test/pos/77_9.txt"]
    d = data(write_archive(tmp_path / "a.tar.gz", files), tmp_path, min_freq=1, max_len=8, truncation=policy,
             val_fraction=0.25)
    seen = [words(d, b, r) for b in d.batches("test") for r in range(len(b["lengths"]))]
    assert expected in seen
    assert all(len(w) <= 8 for w in seen)
    assert [d.itos[i] for i in encode_text(" ".join(f"W{i}" for i in range(20)), d.state()).tolist()] == expected


# ----------------------------------------------------------------------------- batches
def padding(batches) -> float:
    batches = list(batches)
    return sum(b["tokens"].numel() - b["num_tokens"] for b in batches) / sum(b["tokens"].numel() for b in batches)


def served(d: ImdbData, split: str, **kw) -> list[str]:
    """The identifying first word of every review in the split's batches, in order."""
    return [words(d, b, r)[0] for b in d.batches(split, **kw) for r in range(len(b["lengths"]))]


def test_bucketing_cuts_padding_and_serves_each_review_once_per_epoch(tmp_path):
    arc = write_archive(tmp_path / "a.tar.gz", synthetic_reviews(150, 10, tag=True))
    d = data(arc, tmp_path, batch_size=8, bucket_chunks=10, min_freq=1)
    flat = data(arc, tmp_path, batch_size=8, bucket_chunks=1, min_freq=1)  # no sorting: random lengths
    for split in ("train", "val", "test"):
        s = d.splits[split]
        expected = sorted(d.itos[int(d.to_vocab[d.ids[o]])] for o in s.offsets.tolist())
        for epoch in (0, 1):
            assert sorted(served(d, split, epoch=epoch)) == expected  # every review exactly once
    for epoch in (0, 1):
        assert padding(d.batches("train", epoch=epoch)) < 0.5 * padding(flat.batches("train", epoch=epoch))
    assert d.num_batches("train") == len(list(d.batches("train"))) == -(-len(d.splits["train"]) // 8)
    e0, e1 = served(d, "train", epoch=0), served(d, "train", epoch=1)
    assert e0 != e1  # reshuffled each epoch
    assert served(data(arc, tmp_path, batch_size=8, bucket_chunks=10, min_freq=1), "train") == e0  # f(seed, epoch)
    tail = [b["tokens"] for b in d.batches("train", epoch=1, start=5)]
    full = [b["tokens"] for b in d.batches("train", epoch=1)]
    assert len(tail) == len(full) - 5 and all(torch.equal(x, y) for x, y in zip(tail, full[5:]))


# ----------------------------------------------------------------------------- models on real batches
@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "attention", "ngram"])
def test_padding_invariance_through_the_pipeline(name, archive, tmp_path):
    """A review's logits are the same batched alone or, padded by collate, with much longer ones."""
    d = data(archive, tmp_path, min_freq=1)
    s = d.splits["test"]
    order = torch.argsort(s.kept)
    short, longest = order[:1], order[-3:]
    assert s.kept[short] * 4 < s.kept[longest].min()
    extra = {"attention": ["model.dropout=0.0"], "ngram": []}.get(
        name, ["model.dropout=0.0", "model.bidirectional=true", "model.pooling=mean"])
    cfg = make_cfg("data=imdb", *TINY[name], *extra)
    model = instantiate(cfg.model, **d.model_kwargs()).eval()
    model.prepare(lambda: d.batches("train"))  # data-dependent set-up, where the model has one (n-grams)
    alone = d.collate(s, short)
    mixed = d.collate(s, torch.cat([longest[:1], short, longest[1:]]))
    assert mixed["tokens"].shape[1] > alone["tokens"].shape[1] * 4  # really padded
    with torch.no_grad():
        a, _ = model(alone["tokens"], alone["lengths"])
        b, _ = model(mixed["tokens"], mixed["lengths"])
    torch.testing.assert_close(b[1], a[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "attention", "ngram"])
def test_end_to_end_run_tests_the_best_checkpoint(name, archive, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg(*imdb_overrides(name, archive, tmp_path / "cache", "logging.confusion.enabled=true")), run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved["task"] == "classify" and saved["steps"] == 12
    test = saved["test"]
    assert test["test/count"] == 24 and test["test/tn"] + test["test/fp"] + test["test/fn"] + test["test/tp"] == 24
    assert test["test/acc"] == pytest.approx((test["test/tn"] + test["test/tp"]) / 24)
    assert metrics["test"] == test
    # the recorded test metrics are those of best.pt, rebuilt from the checkpoint alone
    ckpt = read_checkpoint(run / "checkpoints" / "best.pt")
    assert ckpt["trainer"]["step"] == saved["best_step"] and ckpt["data"]["kind"] == "imdb"
    model = instantiate(ckpt["config"]["model"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    again = data(archive, tmp_path / "cache", seed=ckpt["config"]["trainer"]["seed"], min_freq=1, max_len=64,
                 batch_size=8, saved=ckpt["data"])
    retest = Classification().evaluate(model, again.batches("test"), torch.device("cpu"),
                                       lambda: torch.autocast("cpu", enabled=False))
    assert retest["loss"] == pytest.approx(test["test/loss"], rel=1e-5)
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    for tag in ("val/acc", "val/loss", "val/tp", "test/acc", "test/loss", "test/fn"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("test/acc")] == [saved["best_step"]]
    assert {"val/confusion", "test/confusion"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("val/confusion")] == [6, 12]


def test_the_classifier_fits_its_training_reviews(archive, tmp_path):
    """Loss, packing, pooling and optimizer together: ~25 epochs of 43 reviews are learned by heart."""
    run = tmp_path / "run"
    train(make_cfg(*imdb_overrides("lstm", archive, tmp_path / "cache", "model.bidirectional=true",
                                   "model.pooling=max", "optimizer.lr=1e-2", "optimizer.weight_decay=0",
                                   "trainer.max_steps=150", "trainer.eval_every=75", "logging.tensorboard=false")), run)
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    model = instantiate(ckpt["config"]["model"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    d = data(archive, tmp_path / "cache", min_freq=1, max_len=64, saved=ckpt["data"],
             seed=ckpt["config"]["trainer"]["seed"])  # the run's split: its training reviews
    fit = Classification().evaluate(model, d.batches("train"), torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert fit["acc"] == 1.0 and fit["loss"] < 0.05, fit


# ----------------------------------------------------------------------------- experiment configs
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_the_imdb_experiments_exist():
    assert {"imdb_seed_rnn", "imdb_lstm", "imdb_attention", "imdb_ngram"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_builds(experiment):
    cfg = make_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.data._target_ == "seqexp.data.imdb.ImdbData"
    model = instantiate(cfg.model, vocab_size=50, num_outputs=2, head="classify", max_len=cfg.data.max_len)
    logits, _ = model(torch.randint(1, 50, (3, 7)), torch.tensor([7, 4, 1]))
    assert logits.shape == (3, 2)  # two logits for the softmax cross-entropy


def test_seed_rnn_is_the_tutorial_setup():
    c = make_cfg("experiment=imdb_seed_rnn")
    assert (c.data.max_vocab, c.data.max_len, c.model.cell, c.model.embed_dim, c.model.hidden_size) == \
        (10000, 150, "rnn", 100, 256)
    assert (c.data.batch_size, c.trainer.max_epochs, c.optimizer._target_) == (32, 1, "torch.optim.Adam")
