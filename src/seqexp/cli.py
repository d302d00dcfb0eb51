"""Hydra entry points (also installed as console scripts). Thin: check the command line, call, report.

Before Hydra starts (and writes anything), the command line is parsed with Hydra's own override
parser and checked, each mistake refused in one line with exit 2: a top-level key or a group
choice that does not exist, a key that is not a key of its group (with the closest), `group=null`
for a group every run needs, a run directory that holds another run or is in use. Then
`resume=` is resolved, and the run directory claimed, so Hydra writes into the right place.
"""

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
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Override, OverrideType
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqexp.config import check_keys, did_you_mean, schema_keys
from seqexp.configs import CONFIG_DIR
from seqexp.errors import UserError, user_errors
from seqexp.locks import claim_output_dir, hydra_dir, release_run_dir
from seqexp.overrides import parse
from seqexp.resume import config_for_resume, read_early, resume_argv
from seqexp.rundir import RunDir

log = logging.getLogger("seqexp")

# whether this command's run directory is new, decided before Hydra makes it (train_main): a
# failed run removes only a directory it made itself
_new_run_dir = False


# ----------------------------------------------------------------------------- the command line
def values(o: Override) -> list[str]:
    """An override's value(s) as strings: one, or each choice of a sweep (`model=lstm,gru`)."""
    if not o.is_sweep_override():
        return ["null" if o.value() is None else str(o.value())]
    try:
        return [str(v) for v in o.sweep_string_iterator()]
    except Exception:  # a range or interval sweep: not a list of names
        return []


def is_group(key: str) -> bool:
    return "." not in key and "/" not in key and key != "hydra" and (CONFIG_DIR / key).is_dir()


def searches_elsewhere(parsed: list[Override]) -> bool:
    """`hydra.searchpath` adds config folders: a group or option may live there (tests/extension)."""
    return any(o.key_or_group == "hydra.searchpath" for o in parsed)


def group_options(group: str) -> list[str]:
    """The options of a config group: its folder's YAML files."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def header(path: Path) -> str:
    """A config file's opening comment: what the option is."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return " ".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))


def check_top_level_keys(parsed: list[Override]) -> None:
    """`seed=3` or `+seed=3`: a top-level key that is neither a config group nor in the schema is
    refused in one line, with the key it probably is (trainer.seed). (With `hydra.searchpath` a
    `+group=option` may name a group of another folder: the composed config is checked instead,
    config.check_keys.)"""
    top = set(schema_keys())
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or "." in key or "/" in key or key == "hydra" or key in top or is_group(key) \
                or (o.is_add() and searches_elsewhere(parsed)):
            continue
        raise UserError(f"'{key}' is not a top-level config key.{did_you_mean(key)}")


def check_group_choices(parsed: list[Override]) -> None:
    """`model=transformer`: one line naming the group's choices and the closest, before Hydra
    (which would print a dozen lines). The closest is the nearest spelling, else the option whose
    description mentions the word (attention.yaml: "Transformer encoder ...")."""
    if searches_elsewhere(parsed):
        return
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or not is_group(key):
            continue
        options = group_options(key)
        for choice in values(o):
            if choice in options or choice == "null":
                continue
            near = difflib.get_close_matches(choice, options, n=1, cutoff=0.6) or [
                option for option in options
                if re.search(rf"\b{re.escape(choice)}\b", header(CONFIG_DIR / key / f"{option}.yaml"), re.I)]
            hint = f"; did you mean {' or '.join(f'{key}={option}' for option in near)}?" if near else "."
            raise UserError(f"{key}={choice}: no such {key}. Choices: {', '.join(options)}{hint}")


def optional_groups(config_name: str = "train") -> set[str]:
    """The groups the primary config lists as `optional`: those a run may leave out."""
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults", [])
    return {k.split()[1] for d in defaults if isinstance(d, DictConfig) for k in d if k.startswith("optional ")}


def null_choices(argv: list[str], parsed: list[Override]) -> list[str]:
    """`recipe=null`: Hydra cannot compose a null group choice next to train.yaml's interpolated
    defaults (`recipe: ${data}_${model}`) and fails with a traceback. An optional group is left
    out, as `~recipe` does; a group every run needs is refused in one line."""
    optional, nulls = optional_groups(), {}
    for o in parsed:
        if o.type is OverrideType.CHANGE and is_group(o.key_or_group) and "null" in values(o):
            key = o.key_or_group
            if key not in optional:
                raise UserError(f"{o.input_line}: every run needs a {key}. Choices: {', '.join(group_options(key))}.")
            if o.is_sweep_override():
                raise UserError(f"{o.input_line}: null cannot be one of a sweep's choices; sweep the others, and run "
                                f"~{key} (the group left out) on its own.")
            nulls[o.input_line] = f"~{key}"
    return [nulls.get(a, a) for a in argv]


def check_nested_keys(argv: list[str], parsed: list[Override]) -> None:
    """`model.hiden_size=3`: a key that is not a key of its node is refused in one line, with the
    closest (Hydra would print seven, advising `+model.hiden_size=3`, which the schema then
    refuses). The config is composed once without those overrides to see each node's keys; a
    command line Hydra cannot compose is left to Hydra's own message."""
    dotted = [o for o in parsed if o.type is OverrideType.CHANGE and "." in o.key_or_group
              and not o.key_or_group.startswith("hydra.")]
    if not dotted:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    rest = [o.input_line for o in parsed if o not in dotted and o.key_or_group != "resume"]
    was = GlobalHydra.instance().is_initialized()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=rest)
    except Exception:
        return
    finally:
        if not was:
            GlobalHydra.instance().clear()
    for o in dotted:
        parent, _, leaf = o.key_or_group.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and leaf not in node:
            keys = [k for k in node.keys() if not str(k).startswith("_")]
            hint = did_you_mean(o.key_or_group, [f"{parent}.{k}" for k in keys])
            raise UserError(f"'{o.key_or_group}' is not a key of '{parent}'.{hint} Its keys: {', '.join(keys)}.")


def compose_train(argv: list[str]) -> DictConfig:
    """The config `scripts/train.py ARGV` composes, after the same checks, for a command that uses
    it without training (seqexp-lr-find): Hydra's compose API, no run, so nothing is written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parsed = parse(argv)
    if parsed is not None:
        check_top_level_keys(parsed)
        argv = null_choices(argv, parsed)
        parsed = parse(argv)
        check_group_choices(parsed)
        check_nested_keys(argv, parsed)
        for o in parsed:
            if o.is_sweep_override():
                raise UserError(f"{o.input_line}: a sweep; give one value (this command composes one config).")
            if o.key_or_group == "resume":
                raise UserError(f"{o.input_line}: this command starts from fresh weights; give the run's overrides "
                                f"instead of resume=.")
    was = GlobalHydra.instance().is_initialized()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(argv))
    except Exception as e:  # Hydra's own refusal, in one line
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"the overrides do not compose: {reason}") from None
    finally:
        if not was:
            GlobalHydra.instance().clear()
    check_keys(cfg)
    return cfg


# ----------------------------------------------------------------------------- the run
@contextmanager
def removed_if_unused(run_dir: Path):
    """A run that fails before writing anything of its own (a config check, missing or offline
    data) leaves no directory behind: the one Hydra just made, with only its own files, is
    removed. Never a directory that existed before the command (a resume, a given
    hydra.run.dir), nor one holding anything else."""
    try:
        yield
    except BaseException:
        try:
            if _new_run_dir and int(os.environ.get("RANK", 0)) == 0 and RunDir(run_dir).only_hydra_files():
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
        with removed_if_unused(Path(hydra_cfg.runtime.output_dir)):
            if cfg.resume is not None:  # the run's saved config, plus this command's overrides
                cfg = config_for_resume(cfg, list(hydra_cfg.overrides.task))
            metrics = train(cfg, hydra_cfg.runtime.output_dir)
    return metrics["objective"]["best"]  # what a Hydra sweeper (Optuna) optimises


def torchrun() -> bool:
    """Started by torchrun with more than one process (README "Scaling out")."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def overwriting(parsed: list[Override]) -> bool:
    return any(o.key_or_group == "trainer.overwrite" and str(o.value()).lower() == "true"
               for o in parsed if not o.is_sweep_override())


def train_main() -> None:
    global _new_run_dir
    if "--version" in sys.argv[1:]:  # seqexp's, not Hydra's (which would print its own)
        from seqexp.options import version_line

        print(version_line())
        return
    if os.environ.get("SEQEXP_DEBUG"):
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # config errors show their traceback too
    claimed = None
    with user_errors():  # everything before Hydra, so that a refused command writes nothing
        parsed = parse(sys.argv[1:])
        if parsed is not None:
            check_top_level_keys(parsed)
            sys.argv[1:] = null_choices(sys.argv[1:], parsed)
            parsed = parse(sys.argv[1:])
            check_group_choices(parsed)
            check_nested_keys(sys.argv[1:], parsed)
        read_early(sys.argv[1:])  # resume=: a crafted or damaged checkpoint is refused now
        sys.argv[1:] = resume_argv(sys.argv[1:])  # ... and Hydra writes into that run
        if torchrun():
            if "-m" in sys.argv or "--multirun" in sys.argv:
                raise UserError("-m/--multirun under torchrun would run the whole sweep in every process; "
                                "sweep with hydra/launcher=submitit_slurm and hydra.launcher.tasks_per_node instead.")
            from seqexp.distributed import receive_run_dir

            sys.argv[1:] = receive_run_dir(sys.argv[1:])
        directory, exact = hydra_dir(sys.argv[1:])
        _new_run_dir = not (exact and directory.exists())  # a `${now:...}` name is new: it holds microseconds
        # writable, not in use, no other run in it (or moved aside): before Hydra writes there
        claimed = claim_output_dir(sys.argv[1:], overwrite=parsed is not None and overwriting(parsed))
    try:
        _train()
    finally:
        if claimed is not None:
            release_run_dir(claimed)
