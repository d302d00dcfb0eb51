"""Trainer overhead: seqexp's training loop against a minimal hand-written PyTorch loop.

Both train the same model (same config, same seed) with the same optimizer, schedule, gradient
clipping, precision, batch size and device, on the same data tensors. The hand-written loop gets
its batches pre-built on the device, the most favourable case for it; seqexp runs its real loop
(data iteration, autocast/scaler plumbing, non-finite guard, TensorBoard logging every
`log_every` steps, progress bar) with evaluation and checkpointing switched off. The two run in
turn, A B A B ..., and the ratio is taken pair by pair so that a slow spell hits both.

    python benchmarks/overhead.py [--steps 200] [--rounds 5] [overrides ...]
    python benchmarks/overhead.py experiment=imdb_attention data.path=...   # any task
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from seqexp.build import build_data, build_model, build_optimizer, instantiate, pick_device, seed_everything
from seqexp.configs import CONFIG_DIR
from seqexp.evaluation import to_device
from seqexp.train import train
from seqexp.trainer import Trainer
from seqexp.update import detach_state

IGNORE = -100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision -> autocast dtype


def config(steps: int, overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[
            f"trainer.max_steps={steps}", f"trainer.max_epochs={10**9}",  # --steps alone sets the length
            f"trainer.eval_every={10**9}",
            f"trainer.checkpoint_every={10**9}", "logging.sample.chars=0",
            # a dataset with a test split (IMDB) would evaluate it after fit on best.pt, never written here
            "logging.test_split.enabled=false", *overrides,
            "trainer.ema=0"])  # the hand-written loop keeps no average: the same computation in both


def seqexp_loop(cfg) -> float:
    """Seconds spent in Trainer.fit, evaluation switched off."""
    seconds = []
    fit = Trainer.fit

    def timed_fit(self):
        self.evaluate_and_save = lambda: None  # not part of the loop's cost
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fit(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        return out

    with patch.object(Trainer, "fit", timed_fit), tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp)
    return seconds[0]


def hand_loop(cfg) -> float:
    """The loop a careful person writes by hand for the same job."""
    t = cfg.trainer
    seed_everything(t.seed)
    device = pick_device(str(t.device))
    data = build_data(cfg.data, seed=t.seed)
    model = build_model(cfg.model, data.model_kwargs())
    # data-dependent set-up (the n-gram model's features), as train() does
    model.prepare(lambda: data.batches("train", stateful=model.stateful, epoch=0))
    model = model.to(device)
    net = torch.compile(model) if t.compile else model
    opt = build_optimizer(cfg.optimizer, model)
    sched = instantiate(cfg.scheduler, optimizer=opt, total_steps=t.max_steps)
    dtype = DTYPES.get(str(t.precision))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    stateful = model.stateful
    lm = data.model_kwargs()["head"] == "lm"
    batches = []
    epoch = 0
    while len(batches) < t.max_steps:
        batches += [to_device(b, device) for b in data.batches("train", stateful=stateful, epoch=epoch)]
        epoch += 1
    batches = batches[: t.max_steps]
    params = [p for p in model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else math.inf
    model.train()
    state = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, new_state = net(b["tokens"], b.get("lengths"), state if b["carry"] else None)
        if lm:  # (B, T, V) against (B, T), padding marked IGNORE
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), ignore_index=IGNORE)
        else:  # classification: (B, C) against (B,)
            loss = F.cross_entropy(logits.float(), b["targets"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        state = detach_state(new_state) if stateful else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def describe(cfg) -> tuple[str, str]:
    """The table's model and data cells, e.g. ('lstm 2 x 256', 'tinyshakespeare.txt, batch 32 x 128')."""
    m, d = cfg.model, cfg.data
    if "cell" in m:
        model = f"{m.cell} {m.num_layers} x {m.hidden_size}"
    elif "d_model" in m:
        conv = f", convolution {m.conv_kernel} wide" if m.get("conv_kernel") else ""
        model = f"attention {m.n_layers} x {m.d_model}, {m.n_heads} heads{conv}"
    else:
        model = m._target_.rsplit(".", 1)[-1]
    source = Path(d.path).name if d.get("path") else d.get("source", "default")
    shape = f"{d.batch_size} x {d.seq_len}" if "seq_len" in d else f"{d.batch_size} x <= {d.max_len} tokens"
    return model, f"{source}, batch {shape}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=attention")
    a = p.parse_args()
    cfg = config(a.steps, ["trainer.progress=true", *a.overrides])
    seqexp_loop(cfg), hand_loop(cfg)  # warm-up: allocator, kernels, caches
    ratios, ours, theirs = [], [], []
    for _ in range(a.rounds):
        s, h = seqexp_loop(cfg), hand_loop(cfg)
        ours.append(a.steps / s)
        theirs.append(a.steps / h)
        ratios.append(h / s)  # = seqexp steps/s / hand-written steps/s
    device = pick_device(str(cfg.trainer.device))
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{' '.join(a.overrides) or 'defaults'} | {hw} | torch {torch.__version__} | "
          f"{a.steps} steps x {a.rounds} rounds")
    print("| model | data | seqexp steps/s | hand-written steps/s | ratio seqexp / hand (median) | min | max |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {' | '.join(describe(cfg))} | {statistics.median(ours):.2f} | {statistics.median(theirs):.2f} | "
          f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
