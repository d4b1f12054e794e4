"""Tensors and nested state as safetensors + JSON: the only formats gkd writes or reads.

Nothing here (or anywhere in gkd) unpickles: optimizer and scheduler states are split into
tensors (safetensors) and a JSON skeleton; RNG states become uint8 tensors plus JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gkd.atomic import atomic_write
from gkd.errors import GkdError

FORMAT_VERSION = 2
"""Version of gkd's checkpoint layout (written into every file set). 2: full tensors in the TP=1
layout under every parallel layout, optimizer state by parameter name, RNG streams per rank;
1: the writing rank's tensors, optimizer state by parameter index (still read)."""
_ALIASES = "gkd.aliases"
_RNG_META = "gkd.rng"


class CheckpointError(GkdError):
    """A checkpoint cannot be written, is damaged, or does not fit what it is loaded into."""


# Safetensors files (atomic writes come from gkd.atomic)

def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous, unshared tensors for safetensors, plus ``{alias: name}`` for tied ones.

    safetensors refuses tensors that share memory (tied embeddings); identical views are saved
    once and restored as the same tensor, any other sharing is broken by a copy.
    """
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        t = tensor.detach()
        if t.numel():
            storage = (str(t.device), t.untyped_storage().data_ptr())
            view = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
            shared = storage in storages
            storages.add(storage)
        else:
            shared = False
        t = t.cpu()
        if shared or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = t
    return out, aliases


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str] | None = None) -> None:
    prepared, aliases = _prepare_tensors(tensors)
    meta = dict(metadata or {})
    if aliases:
        meta[_ALIASES] = json.dumps(aliases)
    save_file(prepared, str(path), metadata=meta or None)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` to ``path`` via a fsynced temporary file and a rename.

    Tied tensors are stored once and come back tied from :func:`load_tensors`.
    """
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and user metadata of a safetensors file (tied names restored); no pickle involved."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    for alias, name in json.loads(meta.pop(_ALIASES, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, meta


@contextlib.contextmanager
def open_tensors(path: Path) -> Iterator[tuple[set[str], Callable[[str], torch.Tensor]]]:
    """The names in a safetensors file (tied names included) and a reader of one tensor at a
    time, so that a rank loads only what it is about to use; no pickle involved."""
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            aliases = json.loads((f.metadata() or {}).get(_ALIASES, "{}"))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None

        def read(name: str) -> torch.Tensor:
            try:
                return f.get_tensor(aliases.get(name, name))
            except (OSError, ValueError, RuntimeError, SafetensorError) as e:
                raise CheckpointError(f"{path}: cannot read {name} ({e})") from None

        yield set(f.keys()) | set(aliases), read


# ---------------------------------------------------------------------------------------------
# Nested state ↔ (tensors, JSON)
# ---------------------------------------------------------------------------------------------

def encode_state(obj: Any, path: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """JSON skeleton of ``obj``; tensors go to ``tensors`` under their dotted path."""
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise CheckpointError(f"cannot store a tensor in JSON state (at '{path}')")
        if path in tensors:
            raise CheckpointError(f"two optimizer state entries map to the key '{path}'")
        tensors[path] = obj
        return {"__tensor__": path}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        def sub(k: Any) -> str:
            return f"{path}.{k}" if path else str(k)
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, sub(k), tensors) for k, v in obj.items()}
        # Optimizer state is keyed by integer parameter ids, which JSON objects cannot keep.
        return {"__items__": [[encode_state(k, sub(k), None), encode_state(v, sub(k), tensors)] for k, v in obj.items()]}
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint (at '{path}')")


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        try:
            return tensors[obj["__tensor__"]]
        except KeyError:
            raise CheckpointError(f"optimizer tensor '{obj['__tensor__']}' is missing") from None
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an ``optimizer.state_dict()`` into tensors and a JSON-able rest (checkpoint format 1,
    whose optimizer state is keyed by parameter index; format 2 keys it by name, see
    :func:`gkd.parallel.fullstate.gather_optimizer`).

    Args:
        state: The optimizer's state dict (``state`` keyed by parameter id, ``param_groups``).

    Returns:
        ``(tensors, meta)``: tensors keyed ``state.<param id>.<name>`` (AdamW's ``step``
        included when it is a tensor), and the structure with every non-tensor value.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT_VERSION, "state_dict": encode_state(dict(state), "", tensors)}
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    return decode_state(meta["state_dict"], tensors)


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------

def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU and every CUDA device), numpy and python RNG states as tensors plus JSON."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python.state"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "gauss_next": gauss_next},
            "cuda_devices": sum(k.startswith("torch.cuda.") for k in tensors)}
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states only when the device count matches."""
    torch.set_rng_state(tensors["torch.cpu"].to(torch.uint8))
    cuda = [tensors[f"torch.cuda.{i}"] for i in range(int(meta.get("cuda_devices", 0)))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["python.state"].tolist()), p["gauss_next"]))


# JSON files of a checkpoint (written inside its temporary directory, fsynced)

def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (streamed; as ``sha256sum`` prints it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # bad UTF-8 or JSON syntax
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
