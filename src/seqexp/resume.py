"""Resume: continue a run in its own directory, from one of its checkpoints.

`resume=` takes a run directory (continues from its last checkpoint), a training checkpoint
inside one (a step checkpoint), or `latest`: the run under outputs/ whose last checkpoint was
written last. The best checkpoint holds no training state: it is refused, naming the last one. The run's config is the one saved in the checkpoint. Overrides may change
how long and how the run is watched (trainer.max_steps, max_epochs, eval_every, logging, ...)
but not what is learned: a change to the model, the data, the optimizer, the scheduler or the
seed is refused, naming the keys -- those make a new run, not the rest of this one. Data that
moved may be given a new `data.path`: its content must then match the checkpoint's fingerprint.

A run that has finished is not trained again: resuming it prints its result and returns at
once, unless the resume raises trainer.max_steps, max_epochs or max_time_s.

Path handling imports no torch: the CLI resolves `resume=` before Hydra starts, so that Hydra
writes into the resumed directory instead of creating an empty new one.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig, OmegaConf

from seqexp.errors import UserError
from seqexp.overrides import last_value, parse
from seqexp.rundir import RunDir

if TYPE_CHECKING:  # the checkpoint module imports torch; resume= is resolved before torch loads
    from seqexp.checkpoint import Checkpoint

# trainer.accumulate: what one optimizer step is (and so the schedule's steps); monitor and
# mode: what the best value so far (and the best checkpoint) was chosen by
FROZEN = ("model", "data", "optimizer", "scheduler", "trainer.seed", "trainer.accumulate", "trainer.monitor",
          "trainer.mode")
# where the data lives, not what it is: may change when the content is verified (a fingerprint)
LOCATION = ("data.path", "data.cache_dir")
ALLOWED = "trainer.* (except trainer.seed, accumulate, monitor and mode) and logging.*"
OUTPUTS = Path("outputs")  # Hydra's run directories, relative to where the command runs


def nearest_runs(path: Path, outputs: Path = OUTPUTS, n: int = 3) -> list[Path]:
    """The run directories whose path is most like `path` (a mistyped or half-remembered one),
    looked for under its deepest existing parent, else under outputs/; at most n."""
    path = Path(path).expanduser()
    base = next((p for p in path.parents if p != Path(".") and p.is_dir()), None)
    base = base if base is not None and base.resolve() != Path.cwd().resolve() else Path(outputs)
    found, root_depth = [], len(base.parts)
    for dirpath, dirs, _ in os.walk(base):
        d = Path(dirpath)
        if RunDir(d).holds_run():
            found.append(d)
            dirs[:] = []  # nothing below a run is another run
        elif len(d.parts) - root_depth >= 4:  # outputs/multirun/<date>/<time>/<job> is the deepest
            dirs[:] = []
    return sorted(found, key=lambda r: -difflib.SequenceMatcher(None, str(path), str(r)).ratio())[:n]


def suggest_runs(path: Path, outputs: Path = OUTPUTS) -> str:
    """' Nearest runs: a, b.' (or '') for a message about a run path that does not exist."""
    near = nearest_runs(path, outputs)
    return f" Nearest runs: {', '.join(map(str, near))}." if near else ""


def resolve(spec: str, outputs: Path = OUTPUTS) -> tuple[Path, Path]:
    """`resume=` value -> (run directory, checkpoint file), both absolute."""
    if spec == "latest":
        ckpt = RunDir.latest(outputs)
        if ckpt is None:
            raise UserError(f"resume=latest: no run with a last checkpoint under {Path(outputs).resolve()}. "
                            f"Run from the directory that holds outputs/, or give resume=RUN_DIR.")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            ckpt = RunDir(path).last
            if not ckpt.is_file():
                raise UserError(f"resume={spec}: {path} has no {ckpt.relative_to(path)} (did the run save a "
                                f"checkpoint?). Give a checkpoint file in it, or start a new run.")
        elif path.is_file():
            ckpt = path
        else:
            raise UserError(f"resume={spec}: no such run directory or checkpoint. Give a run directory "
                            f"(outputs/<date>/<time>), a checkpoint in its {RunDir.CHECKPOINTS}/, or resume=latest."
                            f"{suggest_runs(path, outputs)}")
    ckpt = ckpt.resolve()
    if not RunDir.is_checkpoint_of_a_run(ckpt):
        raise UserError(f"resume={spec}: {ckpt} is not in a run's {RunDir.CHECKPOINTS}/ folder, so there is no "
                        f"run to continue. Give RUN_DIR or RUN_DIR/{RunDir.CHECKPOINTS}/<name>.pt.")
    return RunDir.of(ckpt).path, ckpt


_read: dict[Path, dict] = {}  # checkpoint path -> its content: one read per resume


def read(path: Path, keep: bool = True) -> "Checkpoint":
    """The checkpoint a resume continues from, read (checked by trust.py, its digest verified) once
    per process. `keep=False` hands it over: the last reader, train(), leaves no copy behind."""
    from seqexp import checkpoint

    path = Path(path).resolve()
    ckpt = _read[path] if path in _read else checkpoint.read(path)
    if not checkpoint.resumable(ckpt):
        raise UserError(f"resume={path}: the best checkpoint holds the weights only, no training state "
                        f"(optimizer, schedule, RNG); resume from {RunDir.of(path).last}.")
    if keep:
        _read[path] = ckpt
    else:
        _read.pop(path, None)
    return ckpt


def _hydra_quote(value: Path) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _spec(argv: list[str]) -> Optional[str]:
    spec = last_value(argv, "resume")
    return None if spec in (None, "") else str(spec)


def read_early(argv: list[str]) -> None:
    """Before Hydra starts (and writes its log into the run): read and check the checkpoint, so
    that a crafted or damaged one is refused with nothing written."""
    if (spec := _spec(argv)) is not None:
        read(resolve(spec)[1])


def resume_argv(argv: list[str]) -> list[str]:
    """Command line -> the same with `resume=` resolved once and Hydra pointed at that run.

    `hydra.output_subdir=null` keeps the run's .hydra/config.yaml: the config it was started with.
    """
    spec = _spec(argv)
    if spec is None:
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError("resume= continues one run; it does not combine with -m/--multirun.")
    run_dir, ckpt = resolve(spec)
    replaced = {"resume", "hydra.run.dir", "hydra.output_subdir"}
    ours = {o.input_line for o in parse(argv) or [] if o.key_or_group in replaced}
    keep = [a for a in argv if a not in ours]
    return [*keep, f"resume={_hydra_quote(ckpt)}", f"hydra.run.dir={_hydra_quote(run_dir)}",
            "hydra.output_subdir=null"]


# ----------------------------------------------------------------------------- config
def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config dict's leaves under dot keys: {'optimizer': {'lr': 3e-3}} -> {'optimizer.lr':
    3e-3}; `prefix` is the key of `node` itself. Lists are leaves."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _select(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def frozen_changes(saved: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every difference under FROZEN (plain, resolved dicts)."""
    changes = []
    for key in FROZEN:
        old, now = flat(_select(saved, key), key), flat(_select(new, key), key)
        for k in sorted(old.keys() | now.keys()):
            if k not in ignore and old.get(k, "<unset>") != now.get(k, "<unset>"):
                changes.append(f"{k}: {old.get(k, '<unset>')} -> {now.get(k, '<unset>')}")
    return changes


def check_config(ckpt: "Checkpoint", cfg: DictConfig, path: Path) -> None:
    from seqexp.config import to_container

    verifiable = ckpt["data"].get("fingerprint") is not None  # see check_data
    saved = ckpt["config"]  # an older run's config, with the defaults of keys added since (config.upgrade)
    changes = frozen_changes(saved, to_container(cfg), LOCATION if verifiable else ())
    if changes:
        more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
        raise UserError(f"cannot resume {path} with a different model, data, optimizer, scheduler, seed, "
                        f"accumulation or monitored metric: "
                        f"{'; '.join(changes[:5])}{more}. Drop those overrides, or start a new run; "
                        f"on resume you may change {ALLOWED}.")


def config_for_resume(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The CLI's config for `resume=`: the checkpoint's config with this command's overrides.

    `cfg` is what Hydra composed from the command line; only the keys the overrides name are
    taken from it (already type-checked by Hydra), the rest comes from the checkpoint.
    """
    from seqexp.config import TrainConfig

    _, path = resolve(cfg.resume)
    merged = OmegaConf.create(read(path)["config"])
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "resume":
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if key.split(".")[0] not in cfg or (value is None and "." not in key):
            raise UserError(f"resume: '{o}' is not a config key that can be set on resume; "
                            f"you may change {ALLOWED}.")
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    merged.resume = cfg.resume
    try:  # back onto the typed schema: enums and types as in a fresh run
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), merged)
    except Exception as e:
        raise UserError(f"the config saved in {path} does not fit this version of seqexp ({e}).") from None


# ----------------------------------------------------------------------------- in train()
def load(cfg: DictConfig, run_dir: Optional[Path]) -> tuple[Path, Path, "Checkpoint"]:
    """-> (run directory, checkpoint path, checkpoint), refusing changes to what is learned."""
    resumed_dir, path = resolve(cfg.resume)
    if run_dir is not None and Path(run_dir).resolve() != resumed_dir:
        raise UserError(f"resume continues in the run's own directory, {resumed_dir}, not in {run_dir}.")
    ckpt = read(path, keep=False)
    check_config(ckpt, cfg, path)
    return resumed_dir, path, ckpt


def check_data(state: dict, ckpt: "Checkpoint", path: Path) -> None:
    """The data must be the data the checkpoint was trained on, not only the same config."""
    saved = ckpt["data"].get("fingerprint")
    if saved is not None and saved != state.get("fingerprint"):
        raise UserError(f"the training data is not the data {path} was trained on (same config, different "
                        f"content: was the file changed?). Resume with that data, or start a new run.")


def finished(cfg: DictConfig, ckpt: "Checkpoint", run: RunDir) -> Optional[dict]:
    """The record of a run that has finished, when this resume would not train it further (it
    raises none of trainer.max_steps, max_epochs, max_time_s); else None."""
    record = run.read_metrics()
    if not record or record.get("status") != "finished" or ckpt["trainer"]["step"] != record.get("steps"):
        return None
    old, new = ckpt["config"]["trainer"], cfg.trainer

    def raised(key: str, unlimited) -> bool:  # unlimited: the value that means "no limit"
        return old[key] != unlimited and (new[key] == unlimited or new[key] > old[key])

    if raised("max_steps", -1) or raised("max_epochs", None) or raised("max_time_s", 0):
        return None
    return record
