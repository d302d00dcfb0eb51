"""Verified downloads into a cache directory.

The file is streamed to a temporary name beside its destination and renamed only after its
SHA-256 matches, so an interrupted or tampered download never looks complete.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from seqexp.errors import UserError


def cache_dir(configured: Optional[str] = None) -> Path:
    """`data.cache_dir`, else $SEQEXP_CACHE, else ~/.cache/seqexp."""
    path = configured or os.environ.get("SEQEXP_CACHE") or Path.home() / ".cache" / "seqexp"
    return Path(path).expanduser()


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: Optional[str], *, timeout: float = 60.0,
             progress: bool = True) -> Path:
    """Return `dest`, downloading `url` there first unless a verified copy exists."""
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256sum(dest) == sha256:
            return dest
        dest.unlink()  # a stale or tampered copy: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"could not download {url} ({getattr(e, 'reason', e)}). Without internet, download it "
                f"elsewhere and point data.path at the file."
            ) from None
        with response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=not progress) as bar:
                received = 0
                while block := response.read(1 << 16):
                    f.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise UserError(f"download of {url} was cut off at {received} of {total} bytes; run again.")
            f.flush()
            os.fsync(f.fileno())
        if sha256 is not None and h.hexdigest() != sha256:
            raise UserError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {h.hexdigest()}. "
                f"The file was discarded; run again, or point data.path at a good copy."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)
