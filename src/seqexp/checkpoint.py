"""Checkpoints: atomic writes, safe loads, RNG state as plain values.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: loading never runs code from the file. It holds the resolved
config and the runtime facts (vocabulary), so a model is rebuilt from the file alone.

Writes go to a temporary file in the same directory, are fsynced, then `os.replace`d over the
old file: a crash mid-write leaves the previous checkpoint intact. Step checkpoints
(`step_000200.pt`) are kept for the last `trainer.keep_last` steps; `last.pt` and `best.pt` are
never pruned.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import pickle
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from seqexp.errors import UserError
from seqexp.trust import check_file_config

FORMAT = "seqexp-checkpoint/1"
TMP_MARK = ".tmp-"


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


def save_checkpoint(paths: Path | list[Path], payload: dict) -> None:
    """Serialise once, write to each path. In memory first: torch.save's zip writer can turn the
    file's OSError (disk full) into an opaque RuntimeError; a plain write keeps it an OSError."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        atomic_write(path, lambda f: f.write(data))


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), mode="w")


def remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by a killed writer are never loaded; clear them at start-up."""
    for f in Path(directory).glob(f".*{TMP_MARK}*"):
        f.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}.")
    def damaged(why: str) -> UserError:
        return UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {why}). Use another "
                         f"checkpoint of the run: checkpoints/best.pt or a step_*.pt.")

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
    kwargs = ckpt.get("model_kwargs")
    if not isinstance(kwargs, dict) or not all(isinstance(v, (int, str, type(None))) for v in kwargs.values()):
        raise UserError(f"{path}: its model_kwargs are not plain values; not loaded.")
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
