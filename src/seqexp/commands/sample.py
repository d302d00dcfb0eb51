"""seqexp-sample RUN_DIR [prompt=TEXT] [length=500] [temperature=0.8] [top_k=40] [seed=1337] [greedy=false] [num_samples=1]

Generate text from a language model, printed as it is produced. Recurrent models read the
prompt once and carry their state; attention models slide their context window. With
num_samples > 1 the samples are drawn in parallel and printed one after another when done.
The prompt is taken literally (in bash, $'ROMEO:\\n' puts a newline in it); every character
of it must be in the model's vocabulary.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from seqexp.errors import UserError, user_errors
from seqexp.inference import load_run, text_encoder
from seqexp.options import parse
from seqexp.sampling import TEMPERATURE, TOP_K, generate


@dataclass
class Options:
    prompt: str = field(default="\n", metadata={"help": "text to continue (default: a new line)"})
    length: int = field(default=500, metadata={"help": "tokens (characters) to generate"})
    temperature: float = field(default=TEMPERATURE, metadata={"help": "< 1 sharper, > 1 more random"})
    top_k: Optional[int] = field(default=TOP_K, metadata={"help": "sample among the k likeliest; 0 or null: all"})
    seed: int = field(default=1337, metadata={"help": "the same seed gives the same text"})
    greedy: bool = field(default=False, metadata={"help": "always the likeliest token (ignores temperature, top_k)"})
    num_samples: int = field(default=1, metadata={"help": "samples drawn in parallel"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})


def check(opts: Options) -> None:
    if not opts.prompt:
        raise UserError("prompt is empty; the model needs at least one character to continue "
                        "(leave prompt out to start from a new line).")
    if opts.length < 1 or opts.num_samples < 1:
        raise UserError("length and num_samples must be at least 1.")
    if not opts.greedy and not 0 < opts.temperature < math.inf:  # NaN fails this too
        raise UserError(f"temperature must be > 0 and finite, got {opts.temperature}; for the likeliest "
                        f"text use greedy=true.")
    if opts.top_k is not None and opts.top_k < 0:
        raise UserError(f"top_k must be >= 0 (0: no limit), got {opts.top_k}.")


def sample(path: str, opts: Options, out=None) -> list[str]:
    """Write the samples to `out` (default: stdout, as it is now) as they are generated; return
    them (prompt included)."""
    out = sys.stdout if out is None else out
    check(opts)
    run = load_run(path, opts.device)
    run.require("lm", "sampling", "Use seqexp-predict for classifiers.")
    encoder = text_encoder(run.ckpt)
    unknown = encoder.unknown(opts.prompt) if hasattr(encoder, "unknown") else []
    if unknown:  # id 0 was never an input in training: what follows it would be noise
        shown = " ".join(repr(c) for c in unknown[:10])
        raise UserError(f"the prompt has characters the model never saw in training: {shown}. "
                        f"Remove or replace them.")
    prompt = encoder.encode(opts.prompt)[None, :].repeat(opts.num_samples, 1).to(run.device)  # (N, P)
    g = torch.Generator().manual_seed(opts.seed)
    stream = opts.num_samples == 1
    if stream:
        out.write(opts.prompt)
        out.flush()
    ids = []
    for nxt in generate(run.model, prompt, opts.length, temperature=opts.temperature,
                        top_k=opts.top_k or None, greedy=opts.greedy, generator=g):
        nxt = nxt.tolist()
        ids.append(nxt)
        if stream:
            out.write(encoder.decode(nxt))
            out.flush()
    texts = [opts.prompt + encoder.decode(row) for row in zip(*ids)]
    if stream:
        out.write("\n")
    else:
        for i, text in enumerate(texts):
            out.write(f"--- sample {i + 1} of {len(texts)} ---\n{text}\n")
    out.flush()
    return texts


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        paths, opts, _ = parse(sys.argv[1:] if argv is None else argv, Options, __doc__)
        if len(paths) != 1:
            raise UserError("give one run directory or checkpoint, then key=value options, "
                            "e.g. seqexp-sample outputs/... prompt=ROMEO: length=200.")
        if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets '?'
            sys.stdout.reconfigure(errors="replace")
        try:
            sample(paths[0], opts)
        except BrokenPipeError:  # `| head`: the reader has what it wanted (Python docs' recipe)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)


if __name__ == "__main__":
    main()
