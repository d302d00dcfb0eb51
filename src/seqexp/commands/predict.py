"""seqexp-predict RUN_DIR "some review text" ...   |   seqexp-predict RUN_DIR file=reviews.txt   |   ... | seqexp-predict RUN_DIR

Classify text with a trained classifier: one line out per text in, `label<TAB>probability`
(the probability of that label), in input order. With no text arguments the texts are read
one per line from `file=` or from stdin; blank lines are skipped. Text is encoded with the
run's own vocabulary: unknown tokens map to the unknown id, as in training, and texts longer
than the model's training length are cut to their first `max_len` tokens. A text that
contains '=' goes after `--`. Arguments, files and stdin follow one rule: input that is not
UTF-8 is refused, and so is a text with no token at all (only markup such as `<br />`), which
training leaves out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from seqexp.errors import UserError, user_errors
from seqexp.evaluation import outputs
from seqexp.inference import Run, label_names, load_run, text_encoder
from seqexp.options import parse


@dataclass
class Options:
    file: Optional[str] = field(default=None, metadata={"help": "one text per line ('-': stdin)"})
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})


def predict(run: Run, texts: list[str], batch_size: int = 64) -> list[tuple[str, float]]:
    """texts -> (label, probability of that label) each."""
    run.require("classify", "prediction", "Use seqexp-sample for language models.")
    encoder, names = text_encoder(run.ckpt), label_names(run.ckpt)
    max_len = run.ckpt["model_kwargs"].get("max_len")

    encoded = [encoder.encode(t)[:max_len] for t in texts]
    empty = [i for i, x in enumerate(encoded) if len(x) == 0]
    if empty:  # training leaves such reviews out (with a warning); a label for nothing would be noise
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise UserError(f"text {empty[0] + 1} of {len(texts)}{more} has no token the model reads: "
                        f"{texts[empty[0]][:60]!r}. Remove it; training leaves such reviews out too.")

    def batches():
        for i in range(0, len(encoded), batch_size):
            ids = encoded[i : i + batch_size]
            # (B, T); the padding's value is never read: models mask by length
            yield {"tokens": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0),
                   "lengths": torch.tensor([len(x) for x in ids]), "carry": False}

    out = []
    for _, logits in outputs(run.model, batches(), run.device):  # logits (B, C)
        probs = torch.softmax(logits.float(), -1).cpu()
        p, label = probs.max(-1)
        out += [(names[c], float(q)) for c, q in zip(label.tolist(), p.tolist())]
    return out


def utf8(raw: bytes | str, where: str) -> str:
    """One rule for every input: UTF-8 text, or a one-line refusal naming where the bad byte is.
    (Python hands over undecodable bytes of arguments as lone surrogates: those are refused too.)"""
    try:
        if isinstance(raw, bytes):
            return raw.decode("utf-8")
        raw.encode("utf-8")  # fails on the lone surrogates that stand for undecodable bytes
        return raw
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise UserError(f"{where} is not UTF-8 text (invalid byte at offset {e.start}); convert it, "
                        f"e.g. with `iconv -f latin1 -t utf-8`.") from None


def read_texts(args: list[str], file: Optional[str]) -> list[str]:
    if args and file:
        raise UserError("give texts as arguments or file=..., not both.")
    if args:
        lines: Iterable[str] = [utf8(a, f"text argument {i + 1}") for i, a in enumerate(args)]
    elif file and file != "-":
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"file={file}: cannot read it ({e.strerror or e}).") from None
        lines = utf8(raw, f"file={file}").splitlines()
    elif file == "-" or not sys.stdin.isatty():
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, so that a bad byte is seen, not replaced
        lines = utf8(stdin.read(), "standard input").splitlines()
    else:
        raise UserError('nothing to classify: give a text ("..."), file=PATH, or pipe one text per line on stdin.')
    texts = [t for t in lines if t.strip()]
    if not texts:
        raise UserError("nothing to classify: every given text is blank.")
    return texts


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        args, opts, _ = parse(sys.argv[1:] if argv is None else argv, Options, __doc__)
        if not args:
            raise UserError('give a run directory or checkpoint first, e.g. seqexp-predict outputs/... "great film".')
        run = load_run(args[0], opts.device)
        run.require("classify", "prediction", "Use seqexp-sample for language models.")
        for label, p in predict(run, read_texts(args[1:], opts.file), opts.batch_size):
            print(f"{label}\t{p:.4f}", flush=True)


if __name__ == "__main__":
    main()
