"""Checkpoints: atomic writes, safe loads, RNG state as plain values.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: loading never runs code from the file. It holds the resolved
config and the runtime facts (vocabulary), so a model is rebuilt from the file alone.

Writes go to a temporary file in the same directory, are fsynced, then `os.replace`d over the
old file: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from seqexp.errors import UserError

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


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds objects other than tensors and plain values, so it was not "
                        f"loaded (weights_only=True; nothing in it ran): {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {e}). "
                        f"Use another checkpoint of the run, e.g. checkpoints/best.pt.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a seqexp checkpoint (format {FORMAT} expected).")
    return ckpt


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
