"""Hydra entry points (also installed as console scripts). Thin: parse, call, report errors."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqexp.config import CONFIG_DIR
from seqexp.errors import UserError, user_errors
from seqexp.locks import claim_output_dir, release_run_dir
from seqexp.resume import config_for_resume, read_early, resume_argv

log = logging.getLogger("seqexp")


def explain_unknown_keys(argv: list[str], config_name: str = "train") -> None:
    """After Hydra rejects the overrides: for each `a.b=v` whose key does not exist, list the
    keys that do. Runs only on failure, so a good command line pays nothing for it."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    choices = [o for o in overrides if "." not in o.split("=", 1)[0] and o[0] not in "+~"]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception:
        return  # the group choice itself is wrong; Hydra's message lists the options
    for o in overrides:
        key = o.split("=", 1)[0]
        if o[0] in "+~" or key.startswith("hydra.") or "." not in key:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and leaf not in node:
            keys = ", ".join(k for k in node.keys() if not k.startswith("_"))
            print(f"hint: '{key}' is not a key of '{parent}'. Its keys: {keys}.", file=sys.stderr)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")  # seqexp/configs
def _train(cfg: DictConfig) -> float | None:
    from seqexp.train import train  # torch imports after Hydra has checked the overrides

    hydra_cfg = HydraConfig.get()
    if torchrun():
        from seqexp.distributed import send_run_dir

        send_run_dir(hydra_cfg.runtime.output_dir)  # one run directory for every rank
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a failing job is recorded; the sweep goes on
        from seqexp import preempt
        from seqexp.sweep.job import run_sweep_job

        preempt.listen()  # this job's process, to its end: a stop also between jobs (preempt.py)
        return run_sweep_job(cfg, hydra_cfg)
    with user_errors():
        if cfg.resume is not None:  # the run's saved config, plus this command's overrides
            cfg = config_for_resume(cfg, list(hydra_cfg.overrides.task))
        metrics = train(cfg, hydra_cfg.runtime.output_dir)
    return metrics["objective"]["best"]  # what a Hydra sweeper (Optuna) optimises


def torchrun() -> bool:
    """Started by torchrun with more than one process (README "Scaling out")."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def train_main() -> None:
    if os.environ.get("SEQEXP_DEBUG"):
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # config errors show their traceback too
    with user_errors():  # resume=: before Hydra, so that it uses the run's directory
        read_early(sys.argv[1:])
        sys.argv[1:] = resume_argv(sys.argv[1:])
        if torchrun():
            if "-m" in sys.argv or "--multirun" in sys.argv:
                raise UserError("-m/--multirun under torchrun would run the whole sweep in every process; "
                                "sweep with hydra/launcher=submitit_slurm and hydra.launcher.tasks_per_node instead.")
            from seqexp.distributed import receive_run_dir

            sys.argv[1:] = receive_run_dir(sys.argv[1:])
        claimed = claim_output_dir(sys.argv[1:])  # writable, and not in use by another run: before Hydra writes
    try:
        _train()
    except SystemExit as e:
        if e.code == 1:  # Hydra's exit for a config it could not compose
            explain_unknown_keys(sys.argv[1:])
        raise
    finally:
        if claimed is not None:
            release_run_dir(claimed)
