"""A training step of one model family, timed in two checkouts of seqexp: did a change make it faster?

    git worktree add --detach ../seqexp-old HEAD~1
    python benchmarks/step_ab.py --old ../seqexp-old --model mamba --seq-len 128 --batch 32 --d-model 64

Each checkout runs in its own process (its `src` first on the path), one thread, and times forward +
backward of a language-model step on random tokens; the rounds alternate between the two, and each
side reports the best of them. The time is the thread's CPU time, not the wall clock: another job
on a shared machine takes the CPU away between steps without adding to it (it still costs caches
and memory bandwidth, so compare only the two sides of one run). The loss of the first step is
printed beside it: the same seed in both checkouts should give the same model, whatever got faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one side: build the model from its constructor (keyword args), time `steps` steps, print JSON
WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from seqexp.build import locate
a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = locate(a["target"])(vocab_size=64, num_outputs=64, head="lm", **a["kwargs"])
x = torch.randint(0, 64, (a["batch"], a["seq_len"]))
def step():
    logits = model(x)[0]
    loss = logits.float().logsumexp(-1).mean()
    model.zero_grad()
    loss.backward()
    return loss.item()
first = step()
best = float("inf")
for _ in range(a["steps"]):
    t = time.thread_time()
    step()
    best = min(best, time.thread_time() - t)
print(json.dumps({"loss": first, "best_s": best}))
"""

TARGETS = {"mamba": "seqexp.models.mamba.MambaModel", "deltanet": "seqexp.models.deltanet.DeltaNetModel",
           "mingru": "seqexp.models.minrnn.MinRNNModel", "attention": "seqexp.models.attention.AttentionModel"}


def run(src: Path, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other checkout (its root)")
    p.add_argument("--model", choices=sorted(TARGETS), required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each runs --steps steps per side")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    width = {"mingru": "hidden_size", "attention": "d_model"}.get(a.model, "d_model")
    layers = {"attention": "n_layers"}.get(a.model, "num_layers")
    args = dict(target=TARGETS[a.model], batch=a.batch, seq_len=a.seq_len, steps=a.steps,
                kwargs={width: a.d_model, layers: a.layers})
    sides = {"old": a.old.resolve() / "src", "new": ROOT / "src"}
    best, loss = {k: float("inf") for k in sides}, {}
    for _ in range(a.rounds):
        for k, src in sides.items():
            r = run(src, args)
            best[k], loss[k] = min(best[k], r["best_s"]), r["loss"]
    print(f"| {a.model} | {a.batch} x {a.seq_len}, {a.layers} x {a.d_model} | {best['old'] * 1e3:.0f} ms | "
          f"{best['new'] * 1e3:.0f} ms | {best['old'] / best['new']:.2f}x | {loss['old']:.6f} / {loss['new']:.6f} |")


if __name__ == "__main__":
    main()
