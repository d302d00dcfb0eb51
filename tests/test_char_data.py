"""Character corpus: split, vocabulary, batch layouts, full-split evaluation, bad input."""

from __future__ import annotations

import pytest
import torch

from seqexp.data.char import IGNORE, CharData, stdlib_text
from seqexp.errors import UserError


def data(text_path, **kw) -> CharData:
    return CharData(seed=0, path=str(text_path), **{"batch_size": 4, "seq_len": 16, **kw})


def test_split_and_vocab(tiny_text):
    text = tiny_text.read_text()
    d = data(tiny_text)
    split = int(len(text) * 0.9)
    assert d.decode(d.splits["train"].tolist()) == text[:split]  # contiguous, in order
    assert d.decode(d.splits["val"].tolist()) == text[split:]
    assert d.itos[1:] == sorted(set(text[:split]))
    assert d.vocab_size == len(set(text[:split])) + 1


def test_unseen_characters_map_to_unknown(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab" * 500 + "Z", encoding="utf-8")  # 'Z' only in the validation split
    d = CharData(seed=0, path=str(path), batch_size=2, seq_len=8)
    assert d.splits["val"][-1] == 0
    assert d.encode("Zab").tolist() == [0, d.itos.index("a"), d.itos.index("b")]


def test_stateful_batches_continue_each_stream(tiny_text):
    d = data(tiny_text)
    batches = list(d.batches("train", stateful=True, epoch=0))
    assert len(batches) == d.num_batches("train", stateful=True)
    assert not batches[0]["carry"] and all(b["carry"] for b in batches[1:])
    train = d.splits["train"]
    L = (len(train) - 1) // 4
    for i, b in enumerate(batches):
        assert b["tokens"].shape == (4, 16)
        for s in range(4):  # row s of batch i is chunk i of stream s
            start = s * L + i * 16
            assert torch.equal(b["tokens"][s], train[start : start + 16])
            assert torch.equal(b["targets"][s], train[start + 1 : start + 17])


def test_window_order_depends_on_seed_and_epoch_only(tiny_text):
    d = data(tiny_text)
    a = [b["tokens"] for b in d.batches("train", stateful=False, epoch=3)]
    b = [b["tokens"] for b in data(tiny_text).batches("train", stateful=False, epoch=3)]
    c = [b["tokens"] for b in d.batches("train", stateful=False, epoch=4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len(a) == len(c) == d.num_batches("train", stateful=False)
    resumed = [b["tokens"] for b in d.batches("train", stateful=False, epoch=3, start=5)]
    assert all(torch.equal(x, y) for x, y in zip(a[5:], resumed))


@pytest.mark.parametrize("stateful", [True, False])
def test_evaluation_covers_every_character_once(tiny_text, stateful):
    d = data(tiny_text, batch_size=5, seq_len=13)  # sizes that do not divide the split
    val = d.splits["val"]
    batches = list(d.batches("val", stateful=stateful))
    assert len(batches) == d.num_batches("val", stateful=stateful)
    assert sum(b["num_tokens"] for b in batches) == len(val) - 1
    if stateful:  # reassemble the streams: exactly the split's targets, in order
        rows = torch.cat([b["targets"] for b in batches], dim=1).flatten()
    else:
        rows = torch.cat([b["targets"] for b in batches], dim=0).flatten()
    assert torch.equal(rows[rows != IGNORE], val[1:])


def test_stdlib_corpus_is_deterministic_and_capped():
    a, b = stdlib_text(100_000), stdlib_text(100_000)
    assert a == b and len(a) == 100_000


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"   \n", "has no text"),  # whitespace only: not "empty" (issue 22)
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_text_files_name_the_file(tmp_path, content, expect):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expect) as e:
        CharData(seed=0, path=str(path))
    assert str(path) in str(e.value)


def test_text_too_short_for_batch(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hello world " * 10)
    with pytest.raises(UserError, match="batch_size x data.seq_len"):
        CharData(seed=0, path=str(path), batch_size=32, seq_len=128)
