"""Scratch directories for the benchmarks, removed when the benchmark exits.

Benchmarks write checkpoints and cache shards of hundreds of MB; left behind, a few runs fill a disk.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str, parent: Path | None = None, *, keep: bool = False) -> Path:
    """A new directory under ``parent`` (default: the system temp dir), deleted at exit unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if not keep:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
