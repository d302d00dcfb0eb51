"""Verified downloads into a cache directory.

The file is streamed to a temporary name beside its destination and renamed only after its
SHA-256 matches, so an interrupted or tampered download never looks complete. Errors that may
pass (a reset connection, a timeout, HTTP 5xx) are retried from the start with exponential
backoff; others (404, a checksum mismatch) fail at once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from seqexp.errors import UserError
from seqexp.locks import file_lock

log = logging.getLogger("seqexp")


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


RETRIES = 4  # tries after the first, for errors that may pass (connection reset, timeout, HTTP 5xx)
BACKOFF = 1.0  # seconds before the first retry, doubled for each next one: 1, 2, 4, 8


def cache_name(url: str, default: str) -> str:
    """A file name for `url` in a cache directory: its last path component when that is a plain
    name, else `default`. Never a path ('..', '/') nor a hidden or empty name."""
    name = unquote(urlparse(url).path).replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name.startswith(".") or "\0" in name:
        return default
    return name


DROPPED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError, http.client.HTTPException)


class Transient(Exception):
    """A failed try that a later try may not repeat."""


def transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)  # server trouble, request timeout, rate limit
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    # a connection reset, aborted or cut mid-answer, a timeout. Not a refused connection or an
    # unknown host: offline, those repeat, and the user should hear it at once.
    return isinstance(e, DROPPED)


def download(url: str, dest: Path, sha256: Optional[str], *, timeout: float = 60.0,
             progress: bool = True, retries: Optional[int] = None, backoff: Optional[float] = None) -> Path:
    """Return `dest`, downloading `url` there first unless a verified copy exists.

    Transient errors are retried `retries` times, waiting backoff, 2 x backoff, ...; each try
    starts over (nothing partial is resumed). Permanent ones (404, a bad checksum) fail at once.
    Concurrent runs on one cache (joblib workers, torchrun processes, two terminals) download
    once: the others wait for the lock, then find the verified copy.
    """
    dest = Path(dest)
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF if backoff is None else backoff
    if verified(dest, sha256):
        return dest
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if verified(dest, sha256):  # another process downloaded it while we waited
            return dest
        dest.unlink(missing_ok=True)  # a stale or tampered copy: fetch again
        for attempt in range(retries + 1):
            try:
                return fetch(url, dest, sha256, timeout=timeout, progress=progress)
            except Transient as e:
                if attempt == retries:
                    raise UserError(f"could not download {url} ({e}; tried {retries + 1} times). Without internet, "
                                    f"download it elsewhere and point data.path at the file.") from None
                wait = backoff * 2 ** attempt
                log.warning("download of %s failed (%s); trying again in %.3g s", url, e, wait)
                time.sleep(wait)
    raise AssertionError("unreachable")


def verified(dest: Path, sha256: Optional[str]) -> bool:
    return dest.is_file() and (sha256 is None or sha256sum(dest) == sha256)


def fetch(url: str, dest: Path, sha256: Optional[str], *, timeout: float, progress: bool) -> Path:
    """One try: stream to a temporary file, verify, rename. Raises Transient or UserError."""
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            if transient(e):
                raise Transient(why) from None
            raise UserError(
                f"could not download {url} ({why}). Without internet, download it "
                f"elsewhere and point data.path at the file."
            ) from None
        try:
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
                    raise Transient(f"cut off at {received} of {total} bytes")
                f.flush()
                os.fsync(f.fileno())
        except DROPPED as e:
            raise Transient(f"connection lost: {e or type(e).__name__}") from None
        except OSError as e:  # writing the temporary file
            raise UserError(f"could not write {tmp.parent} while downloading {url} ({e.strerror or e}); "
                            f"free disk space or set data.cache_dir to a writable directory.") from None
        if sha256 is not None and h.hexdigest() != sha256:
            raise UserError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {h.hexdigest()}. "
                f"The file was discarded; run again, or point data.path at a good copy."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)
