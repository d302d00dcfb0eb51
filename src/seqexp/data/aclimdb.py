"""The Large Movie Review Dataset (Maas et al., 2011) on disk: where it comes from, safe reading.

`data.path` may be the official `aclImdb_v1.tar.gz`, any archive with the same layout
(`aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`), or an extracted `aclImdb` directory (or
its parent). With no path, the official archive is downloaded into the cache and verified
against its SHA-256 before it is opened.

Archives are read in one sequential pass, straight into memory: nothing is extracted to disk.
Writing the 50,000 labelled reviews as files took 2.6 to 19.7 s on our shared 2-core machine, and
tarfile's `extractall(filter='data')` 21 s: most or all of the 20 s budget for turning the
archive into cached token ids, for files that would never be read again. The whole archive is still refused at its first unsafe member, as a safe extraction would
be: an absolute path, a `..` component, a symbolic or hard link, a device, FIFO or any other
non-regular file. Only the labelled reviews are read; `train/unsup/`, `.feat` files and the rest
are skipped.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from seqexp.errors import UserError

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
SPLITS = ("train", "test")
LABELS = ("neg", "pos")  # label id = position: pos is class 1, the positive class
WANTED = re.compile(r"aclImdb/(train|test)/(neg|pos)/[^/]+\.txt")


@dataclass
class Review:
    split: str  # train | test
    label: int  # 0 neg, 1 pos
    name: str  # file name, e.g. 123_9.txt (id_rating)
    raw: bytes


def sort_reviews(reviews: list[Review]) -> list[Review]:
    """One fixed order whatever the source: split, label, file name."""
    reviews.sort(key=lambda r: (SPLITS.index(r.split), r.label, r.name))
    return reviews


def check_layout(reviews: list[Review], origin: str) -> None:
    for split in SPLITS:
        for label, name in enumerate(LABELS):
            if not any(r.split == split and r.label == label for r in reviews):
                raise UserError(f"{origin} has no reviews under aclImdb/{split}/{name}/; data.path must be "
                                f"the aclImdb archive, one with its layout, or an extracted aclImdb directory.")


# ----------------------------------------------------------------------------- archives
def unsafe(member: tarfile.TarInfo) -> Optional[str]:
    """Why a member must not be extracted, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in its path"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device, FIFO or other special file"
    return None


def read_archive(archive: Path) -> list[Review]:
    """The labelled reviews of `archive`, after checking every member."""
    reviews = []
    try:
        with tarfile.open(archive, "r:*") as tar:  # any compression; "r:" (not a "r|" stream) notices truncation
            for member in tar:
                why = unsafe(member)
                if why:
                    raise UserError(f"{archive}: refusing archive member '{member.name}' ({why}); nothing "
                                    f"was used. Use the official aclImdb archive or one with its layout.")
                match = WANTED.fullmatch(member.name.removeprefix("./"))
                if member.isfile() and match:
                    raw = tar.extractfile(member).read()
                    reviews.append(Review(match[1], LABELS.index(match[2]), Path(member.name).name, raw))
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        why = str(e)
        if "could not be opened successfully" in why:  # "r:*" lists each compression it tried, one a line
            why = "not a tar archive, plain or compressed with gzip, bzip2 or xz"
        raise UserError(f"could not read {archive} ({' '.join(why.split())}); is it a complete .tar(.gz) "
                        f"archive?") from None
    check_layout(reviews, str(archive))
    return sort_reviews(reviews)


# ----------------------------------------------------------------------------- directories
def find_root(path: Path) -> Optional[Path]:
    """The `aclImdb` directory: `path` itself or its child, or None."""
    for root in (path, path / "aclImdb"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def review_files(root: Path) -> list[tuple[str, int, Path]]:
    files = []
    for split in SPLITS:
        for label, name in enumerate(LABELS):
            folder = root / split / name
            if folder.is_dir():
                files += [(split, label, folder / f) for f in sorted(os.listdir(folder)) if f.endswith(".txt")]
    return files


def fingerprint(root: Path) -> str:
    """SHA-256 over each review file's name, size and modification time: cheap (stat only),
    and changes whenever a file is added, removed or rewritten."""
    h = hashlib.sha256()
    for split, label, f in review_files(root):
        st = f.stat()
        h.update(f"{split}/{LABELS[label]}/{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_reviews(root: Path) -> list[Review]:
    reviews = [Review(split, label, f.name, f.read_bytes()) for split, label, f in review_files(root)]
    check_layout(reviews, str(root))
    return sort_reviews(reviews)
