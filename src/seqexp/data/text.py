"""Word tokenizer and vocabulary for review text.

Tokenizer (the choice, and why):
- `<br />`, the corpus's only markup (about 200k occurrences; other tags are a handful), becomes
  a space. Nothing else is unescaped: entities are practically absent from the corpus.
- Lowercased by default: case adds little to sentiment and would split counts of every word.
- A word is a run of letters and digits, keeping inner apostrophes ("didn't", "it's"): negations
  matter for sentiment and stay one token. Every other non-space character is a token of its own,
  so "!", "?" and ":)" stay visible to the model ("great!!" -> great ! !).
- U+FFFD (what invalid UTF-8 bytes are decoded to, see `decode`) is dropped like whitespace.

Vocabulary: the most frequent tokens of the training reviews, at least `min_freq` times, at most
`max_vocab` of them; id 0 is padding, id 1 every other token.
"""

from __future__ import annotations

import re

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s\ufffd]")


def decode(raw: bytes) -> tuple[str, bool]:
    """bytes -> (text, was valid UTF-8). Invalid bytes become U+FFFD, which `tokenize` drops."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    text = text.replace("<br />", " ")
    return TOKEN.findall(text.lower() if lowercase else text)


def build_vocab(words: list[str], counts: np.ndarray, max_vocab: int, min_freq: int) -> list[str]:
    """-> itos: [PAD, UNK, then the most frequent words]. Ties keep the order of `words`."""
    order = np.argsort(-counts, kind="stable")  # stable: ties broken by position in `words`
    order = order[counts[order] >= min_freq][:max_vocab]
    return [PAD, UNK] + [words[i] for i in order]
