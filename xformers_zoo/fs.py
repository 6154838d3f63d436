"""File-system checks with one-line errors, and writes that a kill cannot leave half done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PathError(ValueError):
    """A path that cannot serve: a file where a folder is needed, or no permission to write."""


def check_writable_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path, after checking that it is a folder this process may write in, or
    that it can be made (its nearest existing parent is a writable folder). Creates nothing;
    raises ``PathError`` naming the path and what it must be."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} is a file; it must be a folder (or not exist yet)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(f"{what} {path} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its parent {existing} exists)"
        raise PathError(f"{what} {path} is not writable{where}; it needs write permission "
                        "for this user, or choose another folder")
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it into place, so that
    readers see the old content or the new, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
