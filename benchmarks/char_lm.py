"""Quality per unit of compute: validation loss against wall time on tiny-shakespeare.

Each model trains under the same training-time budget (`trainer.max_time_s`; evaluation
time is not counted). Its step count -- and so its cosine schedule -- is sized from a short calibration
run of the same config, so every model ends its schedule near the end of the budget. The
validation loss (nats/char, full validation split) is read from each run's TensorBoard events
with their wall times.

    python benchmarks/char_lm.py --data-path ../shared/data/tinyshakespeare.txt --budget 300
    python benchmarks/char_lm.py --preset gpu --budget 180 --data-path ...   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.configs import CONFIG_DIR
from seqexp.train import train

# Per-model overrides on top of each model's YAML and data=shakespeare.
PRESETS = {
    "cpu": {
        "rnn": ["model=rnn", "model.hidden_size=512", "optimizer.lr=2e-3"],
        "lstm": ["model=lstm", "model.hidden_size=256", "model.num_layers=2"],
        "gru": ["model=gru", "model.hidden_size=256", "model.num_layers=2"],
        # the model's defaults (4 x 128, 4 heads) and recipe/shakespeare_attention.yaml
        "attention": ["model=attention", "model.d_model=128", "model.n_layers=4", "model.n_heads=4"],
        # the paper's language-model blocks at its YAML's size (2 x 256, feed-forward 4x)
        "mingru": ["model=mingru"],
        # the GRU above with Muon for its hidden matrices, at the Muon lr the 300-step screen chose
        # (BENCHMARKS.md, "Muon against AdamW": 1e-2; at AdamW's 3e-3 Muon is worse)
        "gru_muon": ["model=gru", "model.hidden_size=256", "model.num_layers=2", "optimizer=muon",
                     "optimizer.muon_lr=1e-2"],
        # attention above with Muon, at the shared lr a 1,000-step screen chose (BENCHMARKS.md, "Muon's
        # learning rate": 3e-3 1.477, 5e-3 1.467, 7e-3 1.463, 1e-2 1.465)
        "attention_muon": ["model=attention", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
                           "optimizer=muon", "optimizer.lr=7e-3"],
        # Mamba at its YAML's size with one decay per head of 64 channels (Mamba-2's SSD scan, ~1.5x
        # the step rate of the per-channel scan on this CPU), its recipe's lr
        "mamba_heads": ["model=mamba", "model.head_dim=64"],
        # DeltaNet at its YAML's size with Muon for its hidden matrices at the recipe's shared lr (a
        # 450-step screen: 1.553 against AdamW's 1.573; muon_lr 1e-2: 1.554)
        "deltanet_muon": ["model=deltanet", "optimizer=muon"],
    },
    "gpu": {  # nanoGPT's "baby GPT" shape, and an LSTM of similar cost
        "attention": ["model=attention", "model.d_model=384", "model.n_heads=6", "model.n_layers=6",
                      "model.dropout=0.2", "data.seq_len=256", "data.batch_size=64", "optimizer.lr=1e-3",
                      "trainer.precision=bf16"],
        "lstm": ["model=lstm", "model.hidden_size=1024", "model.embed_dim=128", "model.num_layers=3",
                 "model.dropout=0.2", "data.batch_size=128", "data.seq_len=128", "trainer.precision=bf16"],
    },
}


def config(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def scalars(run_dir: str, tag: str):
    return EventAccumulator(run_dir).Reload().Scalars(tag)


def run_model(name: str, overrides: list[str], a) -> dict:
    common = ["data=shakespeare", f"data.path={a.data_path}", "trainer.progress=false",
              "logging.sample.chars=0", f"trainer.device={a.device}", *overrides]
    if a.seed is not None:
        common.append(f"trainer.seed={a.seed}")
    # 1. calibrate: characters per second of this config on this machine
    with tempfile.TemporaryDirectory() as tmp:
        train(config([*common, "trainer.max_steps=60", "trainer.eval_every=1000000",
                      "trainer.checkpoint_every=1000000", "trainer.log_every=10"]), tmp)
        rate = statistics.median(e.value for e in scalars(tmp, "train/tokens_per_s")[1:])
    cfg = config(common)
    per_step = cfg.data.batch_size * cfg.data.seq_len
    steps = max(100, int(a.budget * a.fill * rate / per_step))
    # 2. the measured run
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config([*common, f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 12)}",
                      f"trainer.checkpoint_every={10**9}", f"trainer.max_time_s={a.budget}"])
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics = train(cfg, tmp)
        # x: training time (evaluation excluded), logged by the trainer at each evaluation
        clock = {e.step: e.value for e in scalars(tmp, "time/train_s")}
        curve = [(round(clock[e.step], 1), e.step, e.value) for e in scalars(tmp, "val/loss")]
    return {
        "model": name, "params": metrics["num_params"], "steps": metrics["steps"],
        "chars_trained": metrics["steps"] * per_step, "calibrated_chars_per_s": round(rate),
        "best_val_loss": metrics["objective"]["best"], "train_s": metrics["timing"]["train_time_s"],
        "first_below_1.70_s": next((t for t, _, v in curve if v <= 1.70), None),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device == "cuda" else None,
        "curve": curve, "overrides": overrides,
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        t, _, v = zip(*r["curve"])
        ax.plot(t, v, marker="o", ms=3, label=f"{r['model']} ({r['params'] / 1e6:.2f} M)")
    ax.axhline(1.70, ls="--", c="gray", lw=0.8)
    ax.set(xlabel="training time (s), evaluation excluded", ylabel="validation loss (nats/char)", title=title)
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--budget", type=float, default=300.0, help="seconds per model")
    p.add_argument("--fill", type=float, default=0.85, help="share of the budget the schedule is sized for")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--models", default=None,
                   help="comma-separated model configs (default: the preset's); one the preset does not size runs at its YAML's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=None, help="trainer.seed of every run (default: the config's)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    preset = PRESETS[a.preset]
    names = a.models.split(",") if a.models else list(preset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # a family the preset does not size trains at its own YAML's size (its defaults)
    results = [run_model(n, preset.get(n, [f"model={n}"]), a) for n in names]
    hw = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    stem = f"char_lm_{a.preset}_{int(a.budget)}s" + ("" if a.seed is None else f"_seed{a.seed}")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{stem}.png", f"tiny-shakespeare, {int(a.budget)} s per model, {hw}")
    print(f"\n{hw}; torch {torch.__version__}; budget {a.budget:.0f} s per model")
    print("| model | params | steps | chars trained | best val loss | first <= 1.70 at (s) | train time (s) | peak GPU mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['steps']} | {r['chars_trained'] / 1e6:.1f} M | "
              f"{r['best_val_loss']:.3f} | {r['first_below_1.70_s'] or '-'} | {r['train_s']:.0f} | "
              f"{r['peak_gpu_mem_gib'] or '-'} |")


if __name__ == "__main__":
    main()
