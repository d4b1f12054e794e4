"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a mix.

Every file gkd writes that something later reads back — checkpoints, exports, fine-tuned
teachers, summaries — goes through here: write a temporary sibling, fsync it, rename it over
the target, fsync the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a directory's entries (new, renamed or removed names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_sibling(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Produce ``path`` through ``write(tmp_path)``, then fsync and rename it into place.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`atomic_write` of raw bytes."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "fsync_dir", "tmp_sibling"]
