"""Fingerprints of model weights: what a checkpoint or a fine-tuned teacher was made from.

A resumed run refuses teachers whose weights changed since its checkpoint; a fine-tuned
teacher is reused only when its source weights (and stage) are unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from gkd.engine.serialize import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, as ``sha256sum`` prints it; cached in memory by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        with open(path, "rb") as f:
            _FILE_HASHES[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _FILE_HASHES[key]


def sha256_of_checkpoint(path: Path) -> str:
    """Fingerprint of a model's weights: its weight files directly inside ``path``.

    One weight file (or ``path`` being a file): that file's sha256, as ``sha256sum`` prints it.
    Several (sharded checkpoints): the sha256 of their ``"<sha256>  <name>\\n"`` lines in name
    order. File hashes are cached in memory by (path, size, mtime).

    Raises:
        CheckpointError: No weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``).
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    if not files:
        raise CheckpointError(f"{path}: no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    if len(files) == 1:
        return file_sha256(files[0])
    manifest = "".join(f"{file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def teacher_references(teachers: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """``{name: {"path": ..., "sha256": ...}}`` for ``state.json``."""
    return {name: {"path": str(p), "sha256": sha256_of_checkpoint(Path(p))} for name, p in teachers.items()}


def verify_teachers(saved: Mapping[str, Mapping[str, str]], current: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse to resume with teachers whose weights differ from those the checkpoint was trained with.

    Raises:
        CheckpointError: A teacher of the checkpoint is missing now or has other weights.
    """
    problems = []
    for name, ref in saved.items():
        now = current.get(name)
        if now is None:
            problems.append(f"teacher '{name}' is no longer configured")
        elif now["sha256"] != ref["sha256"]:
            problems.append(f"teacher '{name}' changed since the checkpoint ({ref['path']} sha256 "
                            f"{ref['sha256'][:12]}…, now {now['path']} sha256 {now['sha256'][:12]}…)")
    if problems:
        raise CheckpointError("cannot resume: " + "; ".join(problems))


