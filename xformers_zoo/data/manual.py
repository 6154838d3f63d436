"""Shared pieces of the readers of files a user places in ``data.manual_dir``: locating them
(with an error naming the exact file expected), their fingerprint, archive errors, byte tokens,
size limits and the count of skipped records."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from jaxtyping import Int

from xformers_zoo.configs.base import DataConfig

log = logging.getLogger("xformers_zoo.data")
T = TypeVar("T")

# The LRA release (lra_release.gz) unpacks to lra_release/lra_release/<folder>; some copies
# hold the folders one level up or directly in the manual directory.
RELEASE_PREFIXES = ("", "lra_release", "lra_release/lra_release")


def manual_dir(config: DataConfig, expects: str) -> Path:
    """``data.manual_dir`` as a Path; raises naming what it should hold if it is unset or
    missing."""
    if config.manual_dir is None:
        raise ValueError(f"{config.task} with data.source={config.source} needs data.manual_dir, "
                         f"the folder holding {expects}")
    path = Path(config.manual_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.manual_dir {path} does not exist; it should hold "
                                f"{expects}")
    return path


def find(root: Path, names: Sequence[str], *, release: bool = False) -> Path:
    """The first of ``names`` under ``root`` (or, with ``release``, under the release layouts
    ``lra_release/lra_release/``, ``lra_release/``); raises naming where the first one goes."""
    prefixes = RELEASE_PREFIXES if release else ("",)
    for name in names:
        for prefix in prefixes:
            candidate = root / prefix / name
            if candidate.exists():
                return candidate
    others = [str(root / n) for n in names[1:]]
    if release:
        others.append(f"the same under {root / 'lra_release'}/ or "
                      f"{root / 'lra_release' / 'lra_release'}/ (the LRA release's layouts)")
    also = f" (also accepted: {'; '.join(others)})" if others else ""
    raise FileNotFoundError(f"missing {names[0]}: expected {root / names[0]}{also}")


def files_under(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file below it (in a stable order)."""
    if path.is_file():
        return [path]
    out = []
    for folder, _, names in os.walk(path):
        out += [Path(folder) / name for name in names]
    return sorted(out)


def fingerprint(root: Path, files: Sequence[Path]) -> str:
    """12 hex digits of SHA-256 over each file's path relative to ``root``, size and
    modification time: what a build read, so that a replaced, grown or truncated file gives
    another build (an identical copy made with its times kept gives the same)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        name = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


@contextmanager
def open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """Opens a (gzipped) tarball; a truncated or corrupt one raises a ValueError naming it."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                         "download it again") from None


def tar_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    """The content of one member; a truncated archive raises a ValueError naming both."""
    try:
        handle = tar.extractfile(member)
        if handle is None:
            raise ValueError(f"{path}: member {member.name} is not a regular file")
        return handle.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt at {member.name} "
                         f"({type(e).__name__}: {e}); download it again") from None


def byte_tokens(text: bytes, length: int) -> Int[np.ndarray, " n"]:
    """LRA's byte-level ids (byte + 1; 0 is padding), cut to ``length``."""
    return np.frombuffer(text[:length], np.uint8).astype(np.uint16) + 1


def limit(rows: list[T], size: int | None, what: str) -> list[T]:
    """The first ``size`` rows (all if None); asking for more than there are logs a warning
    and keeps them all."""
    if size is None or size >= len(rows):
        if size is not None and size > len(rows):
            log.warning("%s has %d examples, fewer than the %d asked for; using all of them",
                        what, len(rows), size)
        return rows
    return rows[:size]


def label_in_range(value: str, num_classes: int, where: str) -> int:
    """A class index from its text ("1", "1.0"); raises with ``where`` if it is not one."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or not 0 <= number < num_classes:
        raise ValueError(f"{where}: label {value!r} is not a class in 0..{num_classes - 1}")
    return int(number)


class Skipped:
    """Counts records a reader skipped and reports them once, naming a few."""

    def __init__(self, what: str):
        self.what, self.names = what, []

    def add(self, name: str) -> None:
        """Records one skipped item."""
        self.names.append(name)

    def report(self) -> int:
        """Logs a warning if anything was skipped; returns the count."""
        if self.names:
            shown = ", ".join(self.names[:5]) + (" ..." if len(self.names) > 5 else "")
            log.warning("skipped %d %s: %s", len(self.names), self.what, shown)
        return len(self.names)


def split_limit(config: DataConfig, split: str) -> int | None:
    """``data.<split>_size``: the most examples to keep (None keeps all)."""
    return {"train": config.train_size, "validation": config.val_size,
            "test": config.test_size}[split]


def limits_name(config: DataConfig) -> str:
    """The size limits as part of a build name, e.g. ``8000_500_all``."""
    return "_".join("all" if n is None else str(n)
                    for n in (config.train_size, config.val_size, config.test_size))


def parsed_once(read):
    """Caches ``read(path)`` on the file's identity (path, size, modification time): a build
    reads every split from one archive, so it is parsed once, and a replaced archive anew."""

    @functools.lru_cache(maxsize=2)
    def cached(path: str, size: int, mtime_ns: int):
        del size, mtime_ns  # part of the cache key only
        return read(path)

    @functools.wraps(read)
    def wrapper(path):
        stat = Path(path).stat()
        return cached(str(path), stat.st_size, stat.st_mtime_ns)

    return wrapper
