"""Trainer overhead: seqexp's training loop against a minimal hand-written PyTorch loop.

Both train the same model (same config, same seed) with the same optimizer, schedule, gradient
clipping, batch size and device, on the same data tensors. The hand-written loop gets its
batches pre-built on the device, the most favourable case for it; seqexp runs its real loop
(data iteration, autocast/scaler plumbing, non-finite guard, TensorBoard logging every
`log_every` steps, progress bar) with evaluation and checkpointing switched off. The two run in
turn, A B A B ..., and the ratio is taken pair by pair so that a slow spell hits both.

    python benchmarks/overhead.py [--steps 200] [--rounds 5] [overrides ...]
    python benchmarks/overhead.py model=attention data=imdb data.path=...   # any task
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from seqexp.config import CONFIG_DIR
from seqexp.tasks import detach_state, to_device
from seqexp.train import build_optimizer, instantiate, pick_device, seed_everything, train
from seqexp.trainer import Trainer

IGNORE = -100


def config(steps: int, overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[
            f"trainer.max_steps={steps}", f"trainer.eval_every={10**9}",
            f"trainer.checkpoint_every={10**9}", "logging.sample_chars=0", *overrides])


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

    Trainer.fit = timed_fit
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, tmp)
    finally:
        Trainer.fit = fit
    return seconds[0]


def hand_loop(cfg) -> float:
    """The loop a careful person writes by hand for the same job."""
    t = cfg.trainer
    seed_everything(t.seed)
    device = pick_device(str(t.device))
    data = instantiate(cfg.data, seed=t.seed, _convert_="all")
    model = instantiate(cfg.model, **data.model_kwargs()).to(device)
    opt = build_optimizer(cfg.optimizer, model)
    sched = instantiate(cfg.scheduler, optimizer=opt, total_steps=t.max_steps)
    stateful = model.stateful
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
        logits, new_state = model(b["tokens"], b.get("lengths"), state if b["carry"] else None)
        if data.task == "lm":
            loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=IGNORE)
        else:
            loss = F.cross_entropy(logits, b["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        state = detach_state(new_state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{' '.join(a.overrides) or 'defaults'} | {device} | torch {torch.__version__} | "
          f"{a.steps} steps x {a.rounds} rounds")
    print(f"seqexp steps/s median {statistics.median(ours):.2f}; hand-written {statistics.median(theirs):.2f}")
    print(f"ratio seqexp/hand: median {statistics.median(ratios):.4f} min {min(ratios):.4f} max {max(ratios):.4f}")


if __name__ == "__main__":
    main()
