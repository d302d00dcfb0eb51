"""Training throughput (tokens/s) of minGRU/minLSTM against the fused nn.GRU/nn.LSTM and attention,
by sequence length.

Each model is built from its YAML (`model=NAME` plus overrides) as train() builds it, and trained
on random tokens (vocabulary 100) with AdamW: forward, cross-entropy, backward, step. The batch
holds `--tokens` tokens at every length (32 x 128, 8 x 512, 2 x 2048 by default), so a longer
sequence means fewer, longer rows -- what a parallel scan gains from and a sequential recurrence
loses.

Paired rounds: at each length every model takes one timed step per round, in a rotating order, so
a slow spell of a shared machine hits all of them alike. Reported per model: the median step's
tokens/s, and the median over rounds of its speed relative to the first model's step in the
same round.

    OMP_NUM_THREADS=2 python benchmarks/minrnn_throughput.py [--lengths 128,512,2048] [--tokens 4096]
        [--models gru,mingru,mingru_bare,attention,lstm,minlstm] [--rounds 7]

A model name is a config name, or `NAME_bare` / `NAME_seq` / `NAME_log` for model.blocks=false /
model.scan=sequential / model.scan=log of a minRNN config, `mamba_heads` for model.head_dim=64 (one
decay per head of 64 channels, Mamba-2's SSD scan); suffixes combine (`mingru_bare_log`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from seqexp.build import instantiate
from seqexp.configs import CONFIG_DIR
from seqexp.sweep.resources import cpu_name

VOCAB = 100
VARIANTS = {"bare": "model.blocks=false", "seq": "model.scan=sequential", "log": "model.scan=log",
            "heads": "model.head_dim=64"}


def build(name: str, T: int) -> torch.nn.Module:
    base, *variants = name.split("_")
    overrides = [f"model={base}"] + [VARIANTS[v] for v in variants]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        node = compose("train", overrides=overrides).model
    torch.manual_seed(0)
    return instantiate(node, vocab_size=VOCAB, num_outputs=VOCAB, head="lm", max_len=T)


def trainer_step(model: torch.nn.Module, B: int, T: int) -> Callable[[], float]:
    """-> a function that runs one training step and returns its wall-clock seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,512,2048")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--models", default="gru,mingru,mingru_bare,attention,lstm,minlstm")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    models, lengths = a.models.split(","), [int(t) for t in a.lengths.split(",")]
    params = {m: sum(p.numel() for p in build(m, lengths[0]).parameters()) for m in models}
    rows = {m: [] for m in models}
    for T in lengths:
        B = max(1, a.tokens // T)
        steps = {m: trainer_step(build(m, T).train(), B, T) for m in models}
        for step in steps.values():
            step()  # warm-up: allocations, first-call paths
        times = {m: [] for m in models}
        for r in range(a.rounds):
            for m in models[r % len(models):] + models[: r % len(models)]:
                times[m].append(steps[m]())
        for m in models:
            rate = B * T / statistics.median(times[m])
            ratio = statistics.median(t0 / t for t0, t in zip(times[models[0]], times[m]))
            rows[m].append(f"{rate:,.0f} ({ratio:.2f}x)")
            print(f"  T={T} {m}: {', '.join(f'{B * T / t:,.0f}' for t in times[m])} tokens/s", flush=True)
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"{a.tokens} tokens per batch, {a.rounds} paired rounds: median tokens/s (median ratio to {models[0]} "
          f"in the same round)")
    print("| model | params | " + " | ".join(f"T={T}" for T in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for m in models:
        print(f"| {m} | {params[m]:,} | " + " | ".join(rows[m]) + " |")


if __name__ == "__main__":
    main()
