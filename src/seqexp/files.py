"""Files that are whole or absent: atomic writes, strict JSON, and the temporaries they leave.

Every write goes to a temporary file in the same directory, is fsynced, then `os.replace`d over
the old file, and the directory is fsynced so the rename itself survives a power cut: a crash
mid-write leaves the previous file intact. A temporary left by a killed writer is never read;
`remove_stale_tmp` clears them at start-up. Imports no torch (resume paths are resolved before
torch loads); `save_tensors` imports it when called.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from seqexp.errors import UserError

TMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: a write in progress, or one a killed process left


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
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        atomic_write(path, lambda f: f.write(data))


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


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by a killed writer are never loaded; clear them at start-up."""
    for f in Path(directory).glob(f".*{TMP_MARK}*"):
        f.unlink(missing_ok=True)
