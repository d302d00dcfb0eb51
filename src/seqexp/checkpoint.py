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

Writes are atomic (files.py): a crash mid-write leaves the previous checkpoint intact. Where a
run keeps its checkpoints, and which it prunes, is the run directory's business (rundir.py).

Two kinds: a training checkpoint (last, step) holds everything `resume=` needs; the one a run is
used with (best, `for_use`) holds what evaluation and sampling need -- the weights, the
average, the config and the vocabulary -- without optimizer moments, schedule, RNG or carried
state, so it is a fraction of the size. Both read the same way.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any, NotRequired, Optional, TypedDict

import numpy as np
import torch

from seqexp.errors import UserError
from seqexp.files import save_tensors
from seqexp.rundir import RunDir
from seqexp.trust import check_file_config

FORMAT = "seqexp-checkpoint/1"  # unchanged by the digest and "averaged": both optional to a reader
# what only resume needs: left out of the checkpoint a run is used with (`for_use`)
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "window", "ranks", "carried", "monitor")


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
    target: NotRequired[Optional[float]]  # trainer.target when the checkpoint was written
    target_step: NotRequired[Optional[int]]  # the step whose evaluation reached it, or None
    target_train_s: NotRequired[Optional[float]]  # the training time to it
    ranks: NotRequired[list]  # DDP: each rank's {"rng", "window"}, in rank order (distributed.py)
    weights: NotRequired[dict]  # averaged checkpoints: the trained weights (model.state_dict())


class Recipe(TypedDict):
    """What rebuilds the run from a checkpoint alone, besides weights and trainer state."""

    config: dict  # the resolved run config (trust.py decides what of it may be built)
    model_kwargs: dict  # runtime facts the model was built with: vocab_size, num_outputs, head, ...
    data: dict  # the data's state(): kind, vocabulary (itos), fingerprint, ...


class Checkpoint(Recipe):
    """Every key of a checkpoint file. A plain dict when loaded (a TypedDict, not a class of its own),
    so that it saves and loads as plain values with weights_only=True."""

    format: str  # FORMAT
    model: dict  # the weights to use (state_dict); with `averaged`, the moving average
    trainer: TrainerState  # for_use: without TRAINING_STATE
    # True: "model" is the weight average (trainer.ema) and trainer["weights"] the trained
    # weights. Files from before this key said so only by having trainer["weights"]; `read`
    # fills it in for them.
    averaged: bool
    digest: NotRequired[str]  # "sha256:<hex>" of everything else (`digest`); added by `write`


def assemble(recipe: Recipe, model: torch.nn.Module, trainer: TrainerState,
             averaged: Optional[dict] = None) -> Checkpoint:
    """A checkpoint of `model`; with `averaged` (ema.EMA.averaged_state()), that is its "model"."""
    if averaged is None:
        return Checkpoint(format=FORMAT, **recipe, model=model.state_dict(), trainer=trainer, averaged=False)
    return Checkpoint(format=FORMAT, **recipe, model=averaged, averaged=True,
                      trainer={**trainer, "weights": model.state_dict()})


def for_use(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint without what only resume needs (TRAINING_STATE): the best one."""
    return {**ckpt, "trainer": {k: v for k, v in ckpt["trainer"].items() if k not in TRAINING_STATE}}


def resumable(ckpt: Checkpoint) -> bool:
    """Whether the file holds the training state (the best checkpoint of seqexp >= 0.2 does not)."""
    return "optimizer" in ckpt["trainer"]


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
def write(paths: Path | list[Path], ckpt: Checkpoint) -> None:
    """The one checkpoint writer: `ckpt` with its digest, to each path."""
    body = {k: v for k, v in ckpt.items() if k != "digest"}
    save_tensors(paths, {**body, "digest": digest(body)})


def readable_others(path: Path) -> str:
    """The sentence a damaged checkpoint's error ends with: the run's other checkpoints that load,
    in the form to use them (`resume=` for those with the training state)."""
    path = Path(path).resolve()
    run = RunDir.of(path)
    good = []
    for other in run.checkpoint_files():
        if other.resolve() == path:
            continue
        try:
            ckpt = _load(other)
        except UserError:
            continue
        good.append(f"resume={other}" if resumable(ckpt) else f"{other} (for evaluate, sample, predict)")
    if not good:
        return f"No other checkpoint of the run in {run.checkpoints} loads."
    return f"Checkpoints of the run that load: {'; '.join(good)}."


def _load(path: Path) -> Checkpoint:
    """The file's content, checked to be whole and plain (no code runs), or one UserError."""
    def corrupt(why: str) -> UserError:
        return UserError(f"{path} is corrupt ({why}); not loaded.")

    try:
        if not zipfile.is_zipfile(path):  # torch's format is a zip archive, its index at the end
            raise corrupt("not a complete archive")
        with zipfile.ZipFile(path) as archive:  # torch does not check the members' CRCs; this does
            bad = archive.testzip()
        if bad is not None:
            raise corrupt(f"{bad.rsplit('/', 1)[-1]} does not match its checksum")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"could not read {path} ({e.strerror or e}); check that it is a readable file.") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        if found is None:  # whole members whose record does not unpickle: damaged before it was zipped
            raise corrupt("its object record does not unpickle") from None
        raise UserError(f"{path} holds objects other than tensors and plain values ({found.group(0)}), so it "
                        f"was not loaded (nothing in it ran). Load only checkpoints written by seqexp.") from None
    except Exception as e:  # a damaged archive member, ...
        raise corrupt(str(e).splitlines()[0].split(". ")[0][:200]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a seqexp checkpoint (format {FORMAT} expected).")
    check_file_config(ckpt.get("config"), path)  # before anything in it is imported or built
    if "digest" in ckpt:  # absent in files written before it existed
        try:
            found = digest({k: v for k, v in ckpt.items() if k != "digest"})
        except TypeError as e:
            raise corrupt(str(e)) from None
        if found != ckpt["digest"]:
            raise corrupt("its content does not match the digest it was saved with")
    kwargs = ckpt.get("model_kwargs")
    if not isinstance(kwargs, dict) or not all(isinstance(v, (int, str, type(None))) for v in kwargs.values()):
        raise UserError(f"{path}: its model_kwargs are not plain values; not loaded.")
    return ckpt


def read(path: Path) -> Checkpoint:
    """The one checkpoint reader: loads plain values only, refuses a config that names code
    seqexp does not ship (trust.py), verifies the archive's checksums and the digest, and
    upgrades what an older seqexp wrote (`upgraded`). A damaged file is called corrupt, with
    the run's other checkpoints that load."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}.")
    try:
        ckpt = _load(path)
    except UserError as e:
        if " is corrupt (" in str(e):
            raise UserError(f"{e} {readable_others(path)}") from None
        raise
    return upgraded(ckpt)


def upgraded(ckpt: Checkpoint) -> Checkpoint:
    """What an older seqexp wrote, as today's code reads it. Idempotent. Only for a checkpoint
    whose config passed trust.py; the config's own changes are config.upgrade's."""
    from seqexp.config import upgrade

    ckpt.setdefault("averaged", "weights" in ckpt.get("trainer", {}))  # older files: said by trainer["weights"]
    kwargs = dict(ckpt["model_kwargs"])
    if "task" in kwargs and "head" not in kwargs:  # the runtime fact's name before 0.2
        kwargs["head"] = kwargs.pop("task")
    ckpt["model_kwargs"] = kwargs
    ckpt["config"] = upgrade(ckpt["config"])  # resume and the commands alike
    return ckpt


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
