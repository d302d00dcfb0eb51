"""seqexp's attention LM step against a minimal GPT step written from scratch, at the same shape.

The minimal side is what someone comparing frameworks would write in one file: nanoGPT's model
(pre-norm blocks, fused causal SDPA, learned positions, tied embeddings, GPT-2 init), AdamW with
decay on matrices only, gradient clipping at 1.0, a cosine learning rate set by hand each step,
batches already built. seqexp runs its real loop (`train()` with evaluation and checkpoints off:
benchmarks/overhead.py's harness). Same data, batch, optimizer settings and seed; the two run in
turn, A B A B ..., and the ratio is taken pair by pair. Issue 21's target: seqexp / minimal step
time <= 1.00 at each shape.

    python benchmarks/gpt_step.py --data-path ../shared/data/tinyshakespeare.txt [--steps 100 --rounds 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqexp.build import build_data, pick_device, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, however this one is loaded
from overhead import config, seqexp_loop  # noqa: E402

# (name, overrides): nanoGPT's CPU shape ("baby GPT" on a laptop), a wider one, a longer context
SHAPES = [
    ("nanoGPT CPU: 4 x 128, 4 heads, context 64, batch 12", ["model.d_model=128", "model.n_heads=4",
                                                              "data.seq_len=64", "data.batch_size=12"]),
    ("wider: 4 x 256, 8 heads, context 64, batch 12", ["model.d_model=256", "model.n_heads=8",
                                                        "data.seq_len=64", "data.batch_size=12"]),
    ("longer: 4 x 128, 4 heads, context 256, batch 8", ["model.d_model=128", "model.n_heads=4",
                                                         "data.seq_len=256", "data.batch_size=8"]),
]
COMMON = ["model=attention", "model.n_layers=4", "model.dropout=0.0", "optimizer=adamw", "optimizer.lr=1e-3",
          "scheduler=cosine", "scheduler.warmup_steps=10", "trainer.grad_clip=1.0", "trainer.progress=false"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, heads: int, layers: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():  # GPT-2 init
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V)


def minimal_loop(cfg) -> float:
    """Seconds for cfg.trainer.max_steps steps of the minimal GPT on the same batches."""
    t, m, o = cfg.trainer, cfg.model, cfg.optimizer
    seed_everything(t.seed)
    device = pick_device(str(t.device))
    data = build_data(cfg.data, seed=t.seed)
    batches, epoch = [], 0
    while len(batches) < t.max_steps:
        batches += [(b["tokens"].to(device), b["targets"].to(device))
                    for b in data.batches("train", stateful=False, epoch=epoch)]
        epoch += 1
    batches = batches[: t.max_steps]
    model = GPT(data.vocab_size, cfg.data.seq_len, m.d_model, m.n_heads, m.n_layers).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    warmup, steps, min_ratio = cfg.scheduler.warmup_steps, t.max_steps, cfg.scheduler.min_lr_ratio
    model.train()
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        ramp = (i + 1) / warmup if i < warmup else 1.0
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, i - warmup) / max(1, steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = o.lr * (ramp if i < warmup else min_ratio + (1 - min_ratio) * cos)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. trainer.device=cuda")
    a = p.parse_args()
    device = None
    print("| shape | seqexp ms/step | minimal ms/step | ratio seqexp / minimal (median) | min | max |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES:
        cfg = config(a.steps, [*COMMON, *shape, f"data.path={a.data_path}", *a.overrides])
        device = pick_device(str(cfg.trainer.device))
        seqexp_loop(cfg), minimal_loop(cfg)  # warm-up
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours.append(seqexp_loop(cfg) / a.steps)
            theirs.append(minimal_loop(cfg) / a.steps)
        ratios = [s / h for s, h in zip(ours, theirs)]
        print(f"| {name} | {1e3 * statistics.median(ours):.2f} | {1e3 * statistics.median(theirs):.2f} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |", flush=True)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{hw} | torch {torch.__version__} | {a.steps} steps x {a.rounds} rounds, interleaved")


if __name__ == "__main__":
    main()
