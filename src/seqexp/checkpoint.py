"""The checkpoint format: what a checkpoint holds, the one writer and the one reader.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: loading never runs code from the file. It holds the resolved
config and the runtime facts (vocabulary), so a model is rebuilt from the file alone. Its keys
are described by `Checkpoint` and `TrainerState` below; other modules read them through those
types and the helpers here (`trained_weights`, `ema_state`), and never assemble one by hand.

Every checkpoint carries a digest of its content (every tensor and value, hashed canonically,
not the file's bytes), verified when it is read: torch does not check its archive's CRCs, so a
flipped byte in a tensor would otherwise load as a silently different model. Files written
before the digest existed still load.

Writes go to a temporary file in the same directory, are fsynced, then `os.replace`d over the
old file, and the directory is fsynced so the rename itself survives a power cut: a crash
mid-write leaves the previous checkpoint intact. Step checkpoints (`step_000200.pt`) are kept
for the last `trainer.keep_last` steps; `last.pt` and `best.pt` are never pruned.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NotRequired, Optional, TypedDict

import numpy as np
import torch

from seqexp.build import locate
from seqexp.errors import UserError
from seqexp.trust import GROUPS, check_file_config

if TYPE_CHECKING:
    from seqexp.ema import EMA

FORMAT = "seqexp-checkpoint/1"  # unchanged by the digest and "averaged": both optional to a reader
TMP_MARK = ".tmp-"


# ----------------------------------------------------------------------------- the format
class TrainerState(TypedDict):
    """`Trainer.state_dict()`: everything that decides what happens next, for an exact resume."""

    step: int  # optimizer steps taken (skipped batches included)
    epoch: int
    batch_in_epoch: int  # batches of `epoch` already consumed (micro-batches: trainer.accumulate per step)
    carried: Any  # the RNN state carried into the next chunk (B global rows), or None
    best: Optional[float]  # best value of the monitored metric so far (trainer.monitor; finite, or None)
    best_step: Optional[int]
    best_metrics: dict  # "val/..." metrics at best_step
    last_metrics: dict  # "val/..." metrics of the latest evaluation
    skipped: int  # batches dropped by trainer.nonfinite=skip
    elapsed: float  # wall seconds in fit() so far
    eval_s: float  # of which evaluating and checkpointing
    ema_updates: int  # updates of the weight average (0 without trainer.ema)
    window: torch.Tensor  # (3,) open logging window: loss sum, grad-norm sum, steps
    optimizer: dict
    scheduler: dict
    scaler: dict  # fp16 loss scaling ({} when off)
    rng: dict  # rng_state(): python, numpy, torch, cuda
    monitor: NotRequired[dict]  # early stopping: {"reference", "wait"} (seqexp/monitor.py)
    stopped_early: NotRequired[Optional[int]]  # the step at which patience ran out, or None
    ranks: NotRequired[list]  # DDP: each rank's {"rng", "window"}, in rank order (distributed.py)
    weights: NotRequired[dict]  # averaged checkpoints: the trained weights (model.state_dict())


class Recipe(TypedDict):
    """What rebuilds the run from a checkpoint alone, besides weights and trainer state."""

    config: dict  # the resolved run config (trust.py decides what of it may be built)
    model_kwargs: dict  # runtime facts the model was built with: vocab_size, num_outputs, task, ...
    data: dict  # the data's state(): kind, vocabulary (itos), fingerprint, ...


class Checkpoint(Recipe):
    """Every key of a checkpoint file. A plain dict when loaded (a TypedDict, not a class of its own),
    so that it saves and loads as plain values with weights_only=True."""

    format: str  # FORMAT
    model: dict  # the weights to use (state_dict); with `averaged`, the moving average
    trainer: TrainerState
    # True: "model" is the weight average (trainer.ema) and trainer["weights"] the trained
    # weights. Files from before this key said so only by having trainer["weights"]; `read`
    # fills it in for them.
    averaged: bool
    digest: NotRequired[str]  # "sha256:<hex>" of everything else (`digest`); added by `write`


def assemble(recipe: Recipe, model: torch.nn.Module, trainer: TrainerState, ema: Optional[EMA] = None) -> Checkpoint:
    """A checkpoint of `model` (and, with an `ema.EMA`, its average as the "model")."""
    if ema is None:
        return Checkpoint(format=FORMAT, **recipe, model=model.state_dict(), trainer=trainer, averaged=False)
    return Checkpoint(format=FORMAT, **recipe, model=ema.averaged_state(), averaged=True,
                      trainer={**trainer, "weights": model.state_dict()})


def trained_weights(ckpt: Checkpoint) -> dict:
    """The weights the optimizer trained: what a resume continues from."""
    return ckpt["trainer"]["weights"] if ckpt["averaged"] else ckpt["model"]


def ema_state(ckpt: Checkpoint) -> Optional[dict]:
    """The weight average as `EMA.load_state_dict` takes it; None when the file has none."""
    return {"updates": ckpt["trainer"].get("ema_updates", 0), "average": ckpt["model"]} if ckpt["averaged"] else None


# ----------------------------------------------------------------------------- digest
def digest(obj: Any) -> str:
    """sha256 of a canonical encoding of plain values and tensors (dtype, shape and bytes): the
    same for the object before torch.save and after torch.load, wherever it was written."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def _feed(h, x: Any) -> None:
    if torch.is_tensor(x):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype (bf16 too)
    elif isinstance(x, dict):
        h.update(f"D{len(x)}:".encode())
        for k in sorted(x, key=repr):  # int keys (optimizer state) and str keys alike
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):  # one kind: pickling keeps tuples, but nothing relies on it
        h.update(f"L{len(x)}:".encode())
        for v in x:
            _feed(h, v)
    elif x is None or isinstance(x, (bool, int, float, str)):
        r = repr(x)  # floats round-trip exactly; nan and inf have one spelling
        h.update(f"{type(x).__name__}{len(r)}:{r}".encode())
    else:
        raise TypeError(f"a checkpoint holds plain values and tensors only, not {type(x).__name__}")


def nonfinite(ckpt: Checkpoint) -> list[str]:
    """Keys of floating-point tensors holding a NaN or inf (weights, optimizer state, carried
    state); one read per device, not one per tensor."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def visit(x: Any, key: str) -> None:
        if torch.is_tensor(x):
            if x.is_floating_point() or x.is_complex():
                flags.setdefault(x.device, []).append((key, torch.isfinite(x).all()))
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{key}.{i}")

    visit({"model": ckpt["model"], "trainer": ckpt["trainer"]}, "")
    bad = []
    for found in flags.values():
        ok = torch.stack([f for _, f in found]).tolist()
        bad += [k for (k, _), fine in zip(found, ok) if not fine]
    return bad


# ----------------------------------------------------------------------------- files
def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable. Best effort: some systems cannot open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on file systems that do not sync directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or fix permissions. "
                        f"Earlier files in {path.parent} are untouched.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_tensors(paths: Path | list[Path], payload: Any) -> None:
    """Serialise once, write atomically to each path. In memory first: torch.save's zip writer can
    turn the file's OSError (disk full) into an opaque RuntimeError; a plain write keeps it one."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        atomic_write(path, lambda f: f.write(data))


def write(paths: Path | list[Path], ckpt: Checkpoint) -> None:
    """The one checkpoint writer: `ckpt` with its digest, to each path."""
    body = {k: v for k, v in ckpt.items() if k != "digest"}
    save_tensors(paths, {**body, "digest": digest(body)})


def _finite(x: Any) -> Any:
    """NaN and inf -> None: strict JSON has no spelling for them (Python's json writes bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON (a non-finite number is written as null), atomically."""
    clean = _finite(obj)
    atomic_write(path, lambda f: json.dump(clean, f, indent=2, sort_keys=True, allow_nan=False), mode="w")


def remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by a killed writer are never loaded; clear them at start-up."""
    for f in Path(directory).glob(f".*{TMP_MARK}*"):
        f.unlink(missing_ok=True)


def other_checkpoints(path: Path) -> str:
    """The sentence a bad checkpoint's error ends with: which others of its run exist."""
    path = Path(path)
    others = sorted(f.name for f in path.parent.glob("*.pt") if f.name != path.name and not f.name.startswith("."))
    if not others:
        return f"The run has no other checkpoint in {path.parent}."
    return f"Use another checkpoint of the run: {', '.join(others)} (in {path.parent})."


def read(path: Path) -> Checkpoint:
    """The one checkpoint reader: loads plain values only, refuses a config that names code
    seqexp does not ship (trust.py), and verifies the digest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}.")

    def damaged(why: str) -> UserError:
        return UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {why}); not loaded. "
                         f"{other_checkpoints(path)}")

    try:
        if not zipfile.is_zipfile(path):  # torch's format is a zip archive, its index at the end
            raise damaged("not a complete archive")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e}); check that it is a readable file.") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        raise UserError(f"{path} holds objects other than tensors and plain values "
                        f"({found.group(0) if found else str(e).splitlines()[0]}), so it was not loaded "
                        f"(weights_only=True; nothing in it ran). Load only checkpoints written by seqexp.") from None
    except UserError:
        raise
    except Exception as e:  # a damaged archive member, ...
        raise damaged(str(e).splitlines()[0].split(". ")[0]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a seqexp checkpoint (format {FORMAT} expected).")
    check_file_config(ckpt.get("config"), path)  # before anything in it is imported or built
    if "digest" in ckpt:  # absent in files written before it existed
        try:
            found = digest({k: v for k, v in ckpt.items() if k != "digest"})
        except TypeError as e:
            raise damaged(str(e)) from None
        if found != ckpt["digest"]:
            raise damaged("its content does not match the digest it was saved with")
    kwargs = ckpt.get("model_kwargs")
    if not isinstance(kwargs, dict) or not all(isinstance(v, (int, str, type(None))) for v in kwargs.values()):
        raise UserError(f"{path}: its model_kwargs are not plain values; not loaded.")
    ckpt.setdefault("averaged", "weights" in ckpt.get("trainer", {}))  # older files: said by trainer["weights"]
    ckpt["config"] = upgraded_config(ckpt["config"])  # resume and the commands alike
    return ckpt


def upgraded_config(config: dict) -> dict:
    """A config an older seqexp saved, as today's code reads it: the data class upgrades what
    changed meaning (`Dataset.upgrade_config`), then a key added to a component since gets its
    constructor default (the behaviour of the version that saved it, where the new key only
    adds an option). Idempotent. Only for configs that passed trust.py."""
    from seqexp.schema import defaults

    config = dict(config)
    config["data"] = locate(config["data"]["_target_"]).upgrade_config(config["data"])  # first: it sees what is missing
    for group in GROUPS:
        config[group] = {**defaults(config[group]["_target_"]), **config[group]}
    return config


load_checkpoint = read  # the name scripts and the README use


def load_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    """load_state_dict, with a mismatch explained as a config mismatch rather than a traceback."""
    own = model.state_dict()
    problems = [f"{k} is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems += [f"{k} missing from the file" for k in own if k not in state]
    problems += [f"unexpected {k} in the file" for k in state if k not in own]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path} was saved by a different model config: {'; '.join(problems[:3])}{more}. "
                        f"Build the model from the checkpoint's own config (ckpt['config']['model']).")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- retention
STEP_FILE = re.compile(r"step_(\d+)\.pt")


def step_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def prune_step_checkpoints(directory: Path, keep: int, upto: int, protect: frozenset[Path] = frozenset()) -> None:
    """Keep the `keep` newest step checkpoints at or before step `upto`, and every protected one.

    Those after `upto` are left alone: a run resumed from an earlier checkpoint overwrites them
    as it reaches their steps, so they are never the ones pruned in their place.
    """
    found = sorted((int(m.group(1)), f) for f in Path(directory).glob("step_*.pt")
                   if (m := STEP_FILE.fullmatch(f.name)) and int(m.group(1)) <= upto)
    protect = {Path(p).resolve() for p in protect}
    for _, f in found[: max(len(found) - keep, 0)]:
        if f.resolve() not in protect:
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, gauss) -- plain values
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
