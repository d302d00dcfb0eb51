"""Hydra entry points (also installed as console scripts). Thin: parse, call, report errors."""

from __future__ import annotations

import difflib
import itertools
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqexp.config import CONFIG_DIR, check_keys, did_you_mean, schema_keys
from seqexp.errors import UserError, user_errors
from seqexp.locks import claim_output_dir, hydra_dir, release_run_dir
from seqexp.resume import config_for_resume, read_early, resume_argv

log = logging.getLogger("seqexp")

# whether this command's run directory is new, decided before Hydra makes it (train_main): a
# failed run removes only a directory it made itself
_new_run_dir = False


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


def check_top_level_keys(argv: list[str]) -> None:
    """`seed=3` or `+seed=3`: a top-level key that is neither a config group nor in the schema is
    refused in one line, with the key it probably is (trainer.seed), before Hydra writes anything.
    (With `hydra.searchpath` a `+group=option` may name a group of another folder: then the
    composed config is checked instead, check_keys.)"""
    searchpath = any(a.lstrip("+").startswith("hydra.searchpath") for a in argv)
    top = set(schema_keys())
    for a in argv:
        key, eq, _ = a.partition("=")
        plus = key.startswith("+")
        key = key.lstrip("+")
        if not eq or a.startswith(("-", "~")) or "." in key or "/" in key or key == "hydra" or key in top \
                or (CONFIG_DIR / key).is_dir() or (plus and searchpath):
            continue
        raise UserError(f"'{key}' is not a top-level config key.{did_you_mean(key)}")


def header(path: Path) -> str:
    """A config file's opening comment: what the option is."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return " ".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))


def group_options(group: str) -> list[str]:
    """The options of a config group: its folder's YAML files."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """`model=transformer`: one line naming the group's choices and the closest, before Hydra
    (which would print a dozen lines). The closest is the nearest spelling, else the option whose
    description mentions the word (attention.yaml: "Transformer encoder ..."). Left to Hydra when
    `hydra.searchpath` adds config folders, or for sweep syntax such as `choice(...)`."""
    if any(a.lstrip("+").startswith("hydra.searchpath") for a in argv):
        return
    for a in argv:
        key, eq, value = a.lstrip("+").partition("=")
        folder = CONFIG_DIR / key
        if not eq or a.startswith(("-", "~")) or key == "hydra" or "." in key or "/" in key or not folder.is_dir() \
                or "(" in value:
            continue
        options = group_options(key)
        for choice in value.split(","):  # -m model=lstm,gru
            if choice in options:
                continue
            near = difflib.get_close_matches(choice, options, n=1, cutoff=0.6) or [
                o for o in options if re.search(rf"\b{re.escape(choice)}\b", header(folder / f"{o}.yaml"), re.I)]
            hint = f"; did you mean {' or '.join(f'{key}={o}' for o in near)}?" if near else "."
            raise UserError(f"{key}={choice}: no such {key}. Choices: {', '.join(options)}{hint}")


@contextmanager
def removed_if_unused(run_dir: Path, log_name: str):
    """A run that fails before writing anything of its own (a config check, missing or offline
    data) leaves no directory behind: the one Hydra just made, with only its .hydra/ and log
    file, is removed. Never a directory that existed before the command (a resume, a given
    hydra.run.dir), nor one holding anything else."""
    try:
        yield
    except BaseException:
        try:
            if _new_run_dir and int(os.environ.get("RANK", 0)) == 0 and \
                    all(p.name in (".hydra", log_name) for p in run_dir.iterdir()):
                shutil.rmtree(run_dir)
        except OSError:
            pass  # left as it is: the error that matters is the run's
        raise


@hydra.main(config_path="configs", config_name="train", version_base="1.3")  # seqexp/configs
def _train(cfg: DictConfig) -> float | None:
    from seqexp.train import train  # torch imports after Hydra has checked the overrides

    hydra_cfg = HydraConfig.get()
    with user_errors():
        check_keys(cfg)  # `+seed=3`: refused once, not in every job of a sweep
    if torchrun():
        from seqexp.distributed import send_run_dir

        send_run_dir(hydra_cfg.runtime.output_dir)  # one run directory for every rank
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a failing job is recorded; the sweep goes on
        from seqexp import preempt
        from seqexp.sweep.job import run_sweep_job

        preempt.listen()  # this job's process, to its end: a stop also between jobs (preempt.py)
        return run_sweep_job(cfg, hydra_cfg)
    with user_errors():
        with removed_if_unused(Path(hydra_cfg.runtime.output_dir), f"{hydra_cfg.job.name}.log"):
            if cfg.resume is not None:  # the run's saved config, plus this command's overrides
                cfg = config_for_resume(cfg, list(hydra_cfg.overrides.task))
            metrics = train(cfg, hydra_cfg.runtime.output_dir)
    return metrics["objective"]["best"]  # what a Hydra sweeper (Optuna) optimises


def optional_groups(config_name: str = "train") -> set[str]:
    """The groups the primary config lists as `optional`: those a run may leave out."""
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults", [])
    return {k.split()[1] for d in defaults if isinstance(d, DictConfig) for k in d if k.startswith("optional ")}


def null_choices(argv: list[str]) -> list[str]:
    """`recipe=null`: Hydra cannot compose a null group choice next to train.yaml's interpolated
    defaults (`recipe: ${data}_${model}`) and fails with a traceback. An optional group is left
    out, as `~recipe` does; a group every run needs is refused in one line."""
    optional, out = optional_groups(), []
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or "null" not in value.split(",") or a.startswith(("-", "~", "+")) or "." in key \
                or not (CONFIG_DIR / key).is_dir():
            out.append(a)
            continue
        if key not in optional:
            raise UserError(f"{a}: every run needs a {key}. Choices: {', '.join(group_options(key))}.")
        if value != "null":
            raise UserError(f"{a}: null cannot be one of a sweep's choices; sweep the others, and run ~{key} "
                            f"(the group left out) on its own.")
        out.append(f"~{key}")
    return out


def torchrun() -> bool:
    """Started by torchrun with more than one process (README "Scaling out")."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def train_main() -> None:
    global _new_run_dir
    if "--version" in sys.argv[1:]:  # seqexp's, not Hydra's (which would print its own)
        from seqexp.options import version_line

        print(version_line())
        return
    if os.environ.get("SEQEXP_DEBUG"):
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # config errors show their traceback too
    with user_errors():  # resume=: before Hydra, so that it uses the run's directory
        check_top_level_keys(sys.argv[1:])
        sys.argv[1:] = null_choices(sys.argv[1:])
        check_group_choices(sys.argv[1:])
        read_early(sys.argv[1:])
        sys.argv[1:] = resume_argv(sys.argv[1:])
        if torchrun():
            if "-m" in sys.argv or "--multirun" in sys.argv:
                raise UserError("-m/--multirun under torchrun would run the whole sweep in every process; "
                                "sweep with hydra/launcher=submitit_slurm and hydra.launcher.tasks_per_node instead.")
            from seqexp.distributed import receive_run_dir

            sys.argv[1:] = receive_run_dir(sys.argv[1:])
        claimed = claim_output_dir(sys.argv[1:])  # writable, and not in use by another run: before Hydra writes
        directory, exact = hydra_dir(sys.argv[1:])
        _new_run_dir = not (exact and directory.exists())  # a `${now:...}` name is new: it holds microseconds
    try:
        _train()
    except SystemExit as e:
        if e.code == 1:  # Hydra's exit for a config it could not compose
            explain_unknown_keys(sys.argv[1:])
        raise
    finally:
        if claimed is not None:
            release_run_dir(claimed)
