"""seqexp-predict RUN_DIR "some review text" ...   |   seqexp-predict RUN_DIR file=reviews.txt   |   ... | seqexp-predict RUN_DIR

Classify text with a trained classifier: one line out per text in, `label<TAB>probability`
(the probability of that label), in input order. With no text arguments the texts are read
one per line from `file=` or from stdin; blank lines are skipped. Text is encoded with the
run's own vocabulary: unknown tokens map to the unknown id, as in training, and texts longer
than the model's training length are cut to their first `max_len` tokens. A text that
contains '=' goes after `--`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from seqexp.cli import user_errors
from seqexp.errors import UserError
from seqexp.inference import Run, label_names, load_run, text_encoder
from seqexp.options import parse


@dataclass
class Options:
    file: Optional[str] = field(default=None, metadata={"help": "one text per line ('-': stdin)"})
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})


@torch.no_grad()
def predict(run: Run, texts: list[str], batch_size: int = 64) -> list[tuple[str, float]]:
    """texts -> (label, probability of that label) each."""
    run.require("classify", "prediction", "Use seqexp-sample for language models.")
    encoder, names = text_encoder(run.ckpt), label_names(run.ckpt)
    kw = run.ckpt["model_kwargs"]
    max_len, pad = kw.get("max_len"), kw.get("pad_id", 0)
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [encoder.encode(t)[:max_len] for t in texts[i : i + batch_size]]
        ids = [x if len(x) else torch.tensor([pad]) for x in ids]  # nothing to read: one pad token
        lengths = torch.tensor([len(x) for x in ids])
        tokens = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad)  # (B, T)
        logits, _ = run.model(tokens.to(run.device), lengths.to(run.device), None)  # (B, C)
        probs = torch.softmax(logits.float(), -1).cpu()
        p, label = probs.max(-1)
        out += [(names[c], float(q)) for c, q in zip(label.tolist(), p.tolist())]
    return out


def read_texts(args: list[str], file: Optional[str]) -> list[str]:
    if args and file:
        raise UserError("give texts as arguments or file=..., not both.")
    if args:
        lines: Iterable[str] = args
    elif file and file != "-":
        try:
            with open(file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"file={file}: cannot read it as UTF-8 text ({e}).") from None
    elif file == "-" or not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
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
