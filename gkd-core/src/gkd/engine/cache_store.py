"""The teacher cache on disk: content-addressed entries in safetensors shards.

Layout under the cache directory (``GKD_CACHE_DIR``, default ``$XDG_CACHE_HOME/gkd/teacher-cache``)::

    <namespace>/                 one per (teacher weights, rank shard, mode, tokenizer, max length)
        namespace.json           what the namespace holds (written once, for ``gkd cache info``)
        <unique>.safetensors     shards: tensors named ``<entry key>/<feature>``

A shard is written once, to a temporary name and renamed, so readers only ever see whole
files; its header metadata holds the sha256 of its data section, checked the first time a
process reads from it: a damaged shard is deleted and its entries count as missing (they are
recomputed), never used. Runs and ranks sharing the directory each write their own shards
(unique names), so concurrent writers never touch one file. Reads are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

FORMAT = "gkd-teacher-cache/1"
NAMESPACE_FILE = "namespace.json"
SHARD_SUFFIX = ".safetensors"
ENV = "GKD_CACHE_DIR"


def default_cache_dir() -> Path:
    """``GKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/gkd/teacher-cache`` (``~/.cache/...``)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gkd" / "teacher-cache"


class DamagedShard(Exception):
    """A shard whose bytes do not match its recorded hash, or that cannot be parsed."""


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the offset where its data starts."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DamagedShard(f"{path.name}: shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise DamagedShard(f"{path.name}: header length {size} is not plausible")
        header = f.read(size)
    if len(header) != size:
        raise DamagedShard(f"{path.name}: truncated header")
    try:
        return json.loads(header), 8 + size
    except ValueError as exc:
        raise DamagedShard(f"{path.name}: unreadable header ({exc})") from None


def _data_sha256(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(directory: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``tensors`` as one new shard of ``directory`` (atomically) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # Hash the data section as it will lie on disk: serialise once without the hash to learn it.
    blob = save(tensors)
    (size,) = struct.unpack("<Q", blob[:8])
    data_sha = hashlib.sha256(blob[8 + size:]).hexdigest()
    blob = save(tensors, metadata={"format": FORMAT, "data_sha256": data_sha})
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
    final = directory / name
    tmp = directory / f".{name}.tmp"
    with tmp.open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


@dataclass
class Shard:
    path: Path
    names: tuple[str, ...]
    verified: bool = False


class ShardStore:
    """The shards of one namespace: an index ``entry key → {feature: shard}`` built from their
    headers, memory-mapped reads after a one-time hash check per shard and process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index: dict[str, dict[str, Shard]] = {}
        self.dropped: list[str] = []
        """One line per damaged shard found (deleted; its entries are recomputed)."""
        self._handles: dict[Path, object] = {}
        self._known: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index the shards written since (by other ranks and runs sharing the directory)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{SHARD_SUFFIX}")):
            if path in self._known:
                continue
            self._known.add(path)
            try:
                header, _ = _read_header(path)
            except (DamagedShard, OSError) as exc:
                self._drop(path, str(exc))
                continue
            self._add(Shard(path, tuple(k for k in header if k != "__metadata__")))

    def _add(self, shard: Shard) -> None:
        for name in shard.names:
            key, _, feature = name.partition("/")
            self.index.setdefault(key, {})[feature] = shard

    def _drop(self, path: Path, why: str) -> None:
        self.dropped.append(f"teacher cache: {path} is damaged ({why}); deleted, its entries are recomputed")
        self._handles.pop(path, None)
        path.unlink(missing_ok=True)
        for features in self.index.values():
            for feature in [f for f, s in features.items() if s.path == path]:
                del features[feature]

    def has(self, key: str, features: set[str]) -> bool:
        if not features:
            return True
        held = self.index.get(key)
        return held is not None and features <= held.keys()

    def _verify(self, shard: Shard) -> bool:
        if shard.verified:
            return True
        try:
            header, offset = _read_header(shard.path)
            meta = header.get("__metadata__") or {}
            if meta.get("format") != FORMAT:
                raise DamagedShard(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            if _data_sha256(shard.path, offset) != meta.get("data_sha256"):
                raise DamagedShard("its data does not match the sha256 in its header")
        except (DamagedShard, OSError) as exc:
            self._drop(shard.path, str(exc))
            return False
        shard.verified = True
        return True

    def verify(self, keys: list[str], features: set[str]) -> bool:
        """Check (once per shard) every shard holding these entries; False when one was damaged
        (it is dropped, so the entries are missing now)."""
        shards = {id(s): s for k in keys for f, s in self.index.get(k, {}).items() if f in features}
        return all([self._verify(s) for s in shards.values()])

    def get(self, key: str, feature: str) -> torch.Tensor:
        shard = self.index[key][feature]
        handle = self._handles.get(shard.path)
        if handle is None:
            handle = self._handles[shard.path] = safe_open(str(shard.path), framework="pt")
        return handle.get_tensor(f"{key}/{feature}")  # type: ignore[attr-defined]

    def put(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write entries ``{"<key>/<feature>": tensor}`` as one shard and index them."""
        if tensors:
            path = write_shard(self.directory, tensors)
            self._known.add(path)
            self._add(Shard(path, tuple(tensors), verified=True))


# ------------------------------------------------------------------------- info and prune

@dataclass(frozen=True)
class NamespaceInfo:
    directory: Path
    description: dict
    shards: int
    entries: int
    bytes: int
    newest: float


def namespaces(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from sorted(p for p in root.iterdir() if p.is_dir())


def namespace_info(directory: Path) -> NamespaceInfo:
    """Size and entry count of one namespace (from the shard headers; nothing is verified)."""
    shards = sorted(directory.glob(f"*{SHARD_SUFFIX}"))
    keys: set[str] = set()
    total, newest = 0, 0.0
    for path in shards:
        stat = path.stat()
        total += stat.st_size
        newest = max(newest, stat.st_mtime)
        try:
            header, _ = _read_header(path)
        except DamagedShard:
            continue
        keys.update(k.partition("/")[0] for k in header if k != "__metadata__")
    try:
        description = json.loads((directory / NAMESPACE_FILE).read_text())
    except (OSError, ValueError):
        description = {}
    return NamespaceInfo(directory, description, len(shards), len(keys), total, newest)


def prune(root: Path, *, older_than_s: float | None = None, max_bytes: int | None = None,
          everything: bool = False) -> tuple[int, int]:
    """Delete shards: all of them, those not written for ``older_than_s`` seconds, or the oldest
    until the cache holds at most ``max_bytes``. Returns (shards deleted, bytes freed)."""
    shards = [(p.stat().st_mtime, p.stat().st_size, p) for ns in namespaces(root) for p in ns.glob(f"*{SHARD_SUFFIX}")]
    shards.sort()
    now, held = time.time(), sum(s for _, s, _ in shards)
    removed = freed = 0
    for mtime, size, path in shards:
        drop = everything or (older_than_s is not None and now - mtime > older_than_s) or \
            (max_bytes is not None and held > max_bytes)
        if drop:
            path.unlink(missing_ok=True)
            removed, freed, held = removed + 1, freed + size, held - size
    for ns in namespaces(root):
        if not any(ns.glob(f"*{SHARD_SUFFIX}")):
            for leftover in ns.iterdir():
                if leftover.is_file():
                    leftover.unlink()
            ns.rmdir()
    return removed, freed
