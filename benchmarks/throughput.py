"""Training throughput (characters/s) of each model family with its default config.

Runs the real trainer (`seqexp.train.train`) for a few hundred steps per model on the default
corpus and reports the median of the trainer's own `train/tokens_per_s` windows, skipping the
first (warm-up). Models are measured in turn, `--repeats` rounds, so a slow spell of a noisy
machine spreads over all of them.

    python benchmarks/throughput.py [--steps 100] [--repeats 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqexp.configs import CONFIG_DIR
from seqexp.sweep.resources import cpu_name
from seqexp.train import train


def run(model: str, steps: int, extra: list[str]) -> float:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"trainer.max_steps={steps}",
                                          "trainer.eval_every=1000000", "trainer.checkpoint_every=1000000",
                                          "trainer.log_every=10", "trainer.progress=false",
                                          "logging.sample.chars=0", *extra])
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp)
        rates = [e.value for e in EventAccumulator(tmp).Reload().Scalars("train/tokens_per_s")]
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default="rnn,lstm,gru,attention")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    models = a.models.split(",")
    results = {m: [] for m in models}
    for _ in range(a.repeats):
        for m in models:
            results[m].append(run(m, a.steps, a.overrides))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"\n{device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("| model | chars/s (median) | min | max |")
    print("|---|---|---|---|")
    for m in models:
        r = results[m]
        print(f"| {m} | {statistics.median(r):,.0f} | {min(r):,.0f} | {max(r):,.0f} |")


if __name__ == "__main__":
    main()
