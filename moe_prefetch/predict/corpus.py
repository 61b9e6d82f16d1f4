"""Deterministic text corpus built from the running Python's standard library.

Used to train and evaluate the demo model: the ``.py`` sources of the
standard library are split into a train and a held-out part by a stable hash
of each file's relative path, so the split is identical across runs and
machines with the same Python version.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Sequence

logger = logging.getLogger(__name__)

#: Directory names whose contents are never part of the corpus.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip"})

SPLITS = ("train", "heldout")


def stdlib_root() -> pathlib.Path:
    """Return the directory of the running Python's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _relative(path: pathlib.Path) -> str:
    """Return ``path`` relative to the stdlib root as a POSIX string."""
    path = pathlib.Path(path)
    try:
        return path.relative_to(stdlib_root()).as_posix()
    except ValueError:
        return path.as_posix()


def stdlib_files() -> list[pathlib.Path]:
    """Return all stdlib ``.py`` files outside excluded dirs, sorted by relative path."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    logger.debug("found %d stdlib files under %s", len(files), root)
    return files


def is_heldout(path: pathlib.Path, heldout_every: int = 10) -> bool:
    """Return True if ``path`` belongs to the held-out split (stable CRC32 hash)."""
    return zlib.crc32(_relative(path).encode("utf-8")) % heldout_every == 0


def split_files(
    files: Sequence[pathlib.Path], heldout_every: int = 10
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Split ``files`` into (train, heldout), about 1 in ``heldout_every`` held out.

    The assignment depends only on each file's path relative to the stdlib
    root (``zlib.crc32``), never on Python's randomised ``hash()``. Input
    order is preserved within each part.
    """
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    train: list[pathlib.Path] = []
    heldout: list[pathlib.Path] = []
    for path in files:
        (heldout if is_heldout(path, heldout_every) else train).append(path)
    logger.debug("split %d files into %d train / %d heldout", len(files), len(train), len(heldout))
    return train, heldout


def split_of(split: str) -> list[pathlib.Path]:
    """Return the sorted file list of ``split`` ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, heldout = split_files(stdlib_files())
    return train if split == "train" else heldout


def read_text(path: pathlib.Path) -> str:
    """Read one source file as UTF-8, replacing undecodable bytes."""
    return pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


def read_corpus(split: str, max_chars: int | None = None) -> str:
    """Concatenate the texts of ``split``'s files, newline-separated, truncated to ``max_chars``."""
    parts: list[str] = []
    total = 0
    for path in split_of(split):
        text = read_text(path)
        parts.append(text)
        total += len(text) + 1
        if max_chars is not None and total >= max_chars:
            break
    corpus = "\n".join(parts)
    if max_chars is not None:
        corpus = corpus[:max_chars]
    logger.info("read %s corpus: %d files, %d chars", split, len(parts), len(corpus))
    return corpus


def cache_dir() -> pathlib.Path:
    """Where written splits are kept: ($XDG_CACHE_HOME or ~/.cache)/moe-prefetch/corpus."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "moe-prefetch" / "corpus"


def split_file(split: str, folder: pathlib.Path | None = None) -> pathlib.Path:
    """The text of ``split`` as one file (written once, then reused), for commands that read files.

    Named after the Python version, since the standard library, and so the split, differs by version."""
    folder = cache_dir() if folder is None else pathlib.Path(folder)
    path = folder / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{split}.txt"
    if not path.is_file():
        text = read_corpus(split)  # validates `split` before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # a concurrent or interrupted writer never leaves half a file
    return path
