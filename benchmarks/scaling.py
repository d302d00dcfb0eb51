"""Step time and memory against sequence length and batch size, per model family.

One training step (forward, backward, AdamW update) of a language model on random tokens.
Each configuration runs in a fresh subprocess so that its peak resident memory (CPU) or
peak allocated memory (CUDA) is its own; memory is reported above the process's baseline
just before the first step. Recurrent cost should grow linearly with length; attention's
T^2 term shows up as length grows (the fused kernel keeps its memory linear, not its time).
minGRU/minLSTM are recurrences too, but train as a parallel scan over time: linear work that a
GPU can spread over the positions, where rnn/lstm/gru must take their steps one after another.
benchmarks/long_range.py reads this section as its "parallelism" comparison.

    python benchmarks/scaling.py [--lengths 64,128,...,2048] [--batches 8,32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = {  # comparable widths: ~0.7-1 M parameters each
    "rnn": dict(cls="seqexp.models.recurrent.RecurrentModel", cell="rnn", embed_dim=64, hidden_size=256, num_layers=2),
    "lstm": dict(cls="seqexp.models.recurrent.RecurrentModel", cell="lstm", embed_dim=64, hidden_size=256, num_layers=2),
    "gru": dict(cls="seqexp.models.recurrent.RecurrentModel", cell="gru", embed_dim=64, hidden_size=256, num_layers=2),
    "attention": dict(cls="seqexp.models.attention.AttentionModel", d_model=128, n_heads=4, n_layers=4, dropout=0.0),
    # the recurrences that train as a parallel scan over time (minrnn.py), in the paper's blocks
    "mingru": dict(cls="seqexp.models.minrnn.MinRNNModel", cell="gru", hidden_size=128, num_layers=4),
    "minlstm": dict(cls="seqexp.models.minrnn.MinRNNModel", cell="lstm", hidden_size=128, num_layers=4),
}

CHILD = r"""
import json, resource, statistics, sys, time, importlib, torch
import torch.nn.functional as F
spec, T, B, device, reps = json.loads(sys.argv[1])
module, _, name = spec.pop("cls").rpartition(".")
V = 96
torch.manual_seed(0)
model = getattr(importlib.import_module(module), name)(vocab_size=V, num_outputs=V, head="lm", max_len=T, **spec).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(V, (B, T + 1), device=device)
def step():
    logits, _ = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if device == "cuda": torch.cuda.synchronize()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device == "cuda": torch.cuda.reset_peak_memory_stats(); base_cuda = torch.cuda.memory_allocated()
step()  # warm-up; also allocates optimizer state
times = []
for _ in range(reps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
mem = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if device == "cuda" else \
      (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"ms": 1000 * statistics.median(times), "mem_mib": mem}))
"""


def measure(model: str, T: int, B: int, device: str, reps: int) -> dict:
    arg = json.dumps([dict(MODELS[model]), T, B, device, reps])
    out = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"ms": None, "mem_mib": None, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, batch: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in MODELS:
        pts = [(r["T"], r["ms"], r["mem_mib"]) for r in rows if r["model"] == m and r["B"] == batch and r["ms"]]
        if pts:
            T, ms, mem = zip(*pts)
            a1.plot(T, ms, marker="o", label=m)
            a2.plot(T, mem, marker="o", label=m)
    for ax, label in ((a1, "step time (ms)"), (a2, "peak memory above baseline (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
        ax.set_xticks([r["T"] for r in rows if r["model"] == "rnn" and r["B"] == batch],
                      [str(r["T"]) for r in rows if r["model"] == "rnn" and r["B"] == batch])
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,128,256,512,1024,2048")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    rows = []
    for B in map(int, a.batches.split(",")):
        for m in a.models.split(","):
            for T in map(int, a.lengths.split(",")):
                rows.append({"model": m, "T": T, "B": B, **measure(m, T, B, a.device, a.reps)})
                print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scaling_{a.device}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / f"scaling_{a.device}.png", int(a.batches.split(",")[0]),
         f"one training step, batch {a.batches.split(',')[0]}, {a.device}")
    lengths = a.lengths.split(",")
    print("\n| model | batch | " + " | ".join(f"T={t}" for t in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for B in map(int, a.batches.split(",")):
        for m in a.models.split(","):
            cells = [r for r in rows if r["model"] == m and r["B"] == B]
            fmt = lambda r: "error" if r["ms"] is None else f"{r['ms']:.0f} ms / {r['mem_mib']:.0f} MiB"
            print(f"| {m} | {B} | " + " | ".join(fmt(r) for r in cells) + " |")


if __name__ == "__main__":
    main()
