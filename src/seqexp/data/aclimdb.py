"""The Large Movie Review Dataset (Maas et al., 2011) on disk: where it comes from, safe extraction.

`data.path` may be the official `aclImdb_v1.tar.gz`, any archive with the same layout
(`aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`), or an extracted `aclImdb` directory (or
its parent). With no path, the official archive is downloaded into the cache and verified
against its SHA-256 before it is opened.

Extraction reads the archive as a stream and refuses the whole archive at the first unsafe
member: an absolute path, a `..` component, a symbolic or hard link, a device, FIFO or any
other non-regular file. Every member also passes tarfile's own `data` filter
(`tarfile.data_filter`, what `extractall(filter='data')` applies). Only the labelled reviews
and the README are written, into a temporary directory renamed when complete; the unlabelled
`train/unsup/` reviews and the `.feat` files are skipped. The reviews are kept in memory on
the way, so they are tokenized without reading 50,000 files back.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
WANTED = re.compile(r"aclImdb/(?:(train|test)/(neg|pos)/[^/]+\.txt|README)")


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


def extract_reviews(archive: Path, dest: Path) -> list[Review]:
    """Stream `archive`, write its labelled reviews and README under `dest`, return the reviews.

    `dest` appears (by rename) only once everything is extracted and the layout is checked.
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    reviews, made = [], set()
    try:
        with tarfile.open(archive, "r|*") as tar:  # a stream: one pass, any compression
            for member in tar:
                why = unsafe(member)
                if why:
                    raise UserError(f"{archive}: refusing archive member '{member.name}' ({why}); nothing "
                                    f"was extracted. Use the official aclImdb archive or one with its layout.")
                name = member.name.removeprefix("./")
                match = WANTED.fullmatch(name)
                if not (member.isfile() and match):
                    continue  # directories are made as needed; unsup/, .feat, imdb.vocab are skipped
                tarfile.data_filter(member, str(tmp))  # a second opinion: raises FilterError
                raw = tar.extractfile(member).read()
                target = tmp / name
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                with open(target, "xb") as f:  # x: a name twice in the archive is an error
                    f.write(raw)
                if match.group(1):
                    reviews.append(Review(match.group(1), LABELS.index(match.group(2)), Path(name).name, raw))
        check_layout(reviews, str(archive))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same extraction first: theirs is as good
            if not dest.is_dir():
                raise
    except tarfile.FilterError as e:
        raise UserError(f"{archive}: tarfile's data filter refused a member ({e}); nothing was extracted.") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"could not extract {archive} into {dest.parent} ({e}). Is it a complete "
                        f".tar(.gz) archive, and is there disk space?") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
