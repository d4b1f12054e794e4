"""Crash-safe checkpoints made only of safetensors and JSON (nothing is ever unpickled).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-<global_step:08d>/``:

===========================  ===========================================================
``model.safetensors``        student (or trained model) weights
``auxiliary.safetensors``    trainable method parameters (the auxiliary model)
``optimizer.safetensors``    every tensor of the optimizer state (``state.<id>.<name>``)
``optimizer.json``           the rest of it: param groups, python numbers, structure
``scheduler.json``           LR scheduler state
``rng.safetensors``          torch CPU/CUDA, numpy and python RNG states
``state.json``               :class:`CheckpointState` (steps, data position, method states,
                             metrics, teacher hashes)
``config.json``              the fully defaulted run config, when given
``COMPLETE``                 written last: format version and every file's size
===========================  ===========================================================

A checkpoint is written into ``step-<n>.tmp-<pid>``, every file and the directory are
fsynced, and only then is it renamed to its final name; ``latest`` (a pointer for people and
tools) is replaced atomically afterwards. A crash at any point leaves the previous checkpoint
intact, and :func:`find_latest` only considers directories with a ``COMPLETE`` marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.atomic import atomic_write_bytes, fsync_dir
from gkd.engine.serialize import (
    _RNG_META,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    decode_state,
    encode_state,
    flatten_optimizer_state,
    load_tensors,
    read_json,
    restore_rng_state,
    unflatten_optimizer_state,
    write_json,
    write_safetensors,
)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LEFTOVER = re.compile(r"^step-\d{8,}\.(?:tmp|old)-(\d+)$")





@dataclass
class CheckpointState:
    """Everything besides tensors needed to continue a run exactly where it stopped."""

    global_step: int
    stage_index: int = 0
    stage_iteration: int = 0
    """Optimizer steps done in the current stage."""
    data_position: dict[str, Any] = field(default_factory=dict)
    """``BatchIterator.state_dict()`` of the training data."""
    method_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{name: {"path": ..., "sha256": ...}}`` (see :func:`teacher_references`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointState:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{global_step:08d}"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: its ``COMPLETE`` marker and ``state.json`` exist."""
    return (path / COMPLETE).is_file() and (path / "state.json").is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(global_step, dir)``, oldest first (temp dirs ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted((step, p) for step, p in found if is_complete(p))


def find_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None.

    Directories are scanned rather than trusting ``latest``, which may lag behind the newest
    checkpoint if the process died between the two renames.
    """
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def _empty_extra_states(module: nn.Module) -> dict[str, None]:
    """``*._extra_state`` entries that are None (megatron's local linear layers declare one)."""
    return {k: None for k, v in module.state_dict().items() if k.endswith("._extra_state") and v is None}


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    if obj is None:
        return {}
    if isinstance(obj, nn.Module):
        # Empty extra states carry nothing; they are re-supplied on load.
        return {k: v for k, v in obj.state_dict().items() if v is not None}
    return obj


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_checkpoint(path: Path) -> None:
    # Drop the marker first: a half-deleted directory must never look complete.
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: Path, state: CheckpointState, *, model: nn.Module | Mapping[str, torch.Tensor],
                    auxiliary: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    config: Mapping[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write a checkpoint atomically, point ``latest`` at it and prune old ones.

    Args:
        run_dir: The run directory (checkpoints go to ``<run_dir>/checkpoints``).
        state: Steps, data position, method states, metrics and teacher hashes.
        model: The trained model or its state dict.
        auxiliary: Method parameters (module or state dict).
        optimizer: Its full state is saved when given.
        scheduler: Its state is saved when given.
        config: The run config, saved as ``config.json``.
        keep_last: Keep only this many complete checkpoints (the new one always survives).

    Returns:
        The final checkpoint directory.

    Raises:
        CheckpointError: A state that cannot be stored (e.g. non-JSON method state).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, state.global_step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    old = root / f"{final.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", _state_dict(model))
        write_safetensors(tmp / "auxiliary.safetensors", _state_dict(auxiliary))
        if optimizer is not None:
            tensors, meta = flatten_optimizer_state(optimizer.state_dict())
            write_safetensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
        if scheduler is not None:
            write_json(tmp / "scheduler.json", encode_state(scheduler.state_dict(), "scheduler", None))
        rng_tensors, rng_meta = capture_rng_state()
        write_safetensors(tmp / "rng.safetensors", rng_tensors, {_RNG_META: json.dumps(rng_meta)})
        try:
            write_json(tmp / "state.json", state.to_dict())
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint state is not JSON-serialisable ({e}); method states must be "
                                  f"plain JSON") from None
        if config is not None:
            write_json(tmp / "config.json", dict(config))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        write_json(tmp / COMPLETE, {"format": FORMAT_VERSION, "global_step": state.global_step, "files": files})
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. at the end of a resumed stage)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_bytes(root / LATEST, f"{final.name}\n".encode())
    _clean_leftovers(root)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last, protect=final)
    return final


def _clean_leftovers(root: Path) -> None:
    """Remove temp dirs of writers that died mid-save (a live writer's temp dir is kept)."""
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    checkpoints = [p for _, p in list_checkpoints(run_dir)]
    keep = set(checkpoints[-keep_last:]) | ({protect} if protect else set())
    removed = [p for p in checkpoints if p not in keep]
    for p in removed:
        _remove_checkpoint(p)
    return removed


def _load_module(module: nn.Module, path: Path, strict: bool) -> None:
    tensors, _ = load_tensors(path)
    try:
        module.load_state_dict({**_empty_extra_states(module), **tensors}, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model: {e}") from None


def load_checkpoint(path: Path, *, model: nn.Module | None = None, auxiliary: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    restore_rng: bool = True, strict: bool = True) -> CheckpointState:
    """Restore what is given from a checkpoint directory, using only safetensors and JSON.

    Args:
        path: A complete checkpoint directory (e.g. from :func:`find_latest`).
        model: Receives ``model.safetensors``.
        auxiliary: Receives ``auxiliary.safetensors``.
        optimizer: Receives the optimizer state (build it over the same parameters first).
        scheduler: Receives the scheduler state.
        restore_rng: Also restore the torch/numpy/python RNG states.
        strict: Passed to ``load_state_dict`` of model and auxiliary.

    Returns:
        The saved :class:`CheckpointState`.

    Raises:
        CheckpointError: Incomplete or damaged checkpoint, or state that does not fit.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker or state.json)")
    marker = read_json(path / COMPLETE)
    if int(marker.get("format", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer gkd (checkpoint format {marker['format']}, "
                              f"this one reads up to {FORMAT_VERSION})")
    for name, size in marker.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has "
                                  f"{'no file' if actual is None else f'{actual} bytes'}, expected {size} bytes")
    if model is not None:
        _load_module(model, path / "model.safetensors", strict)
    if auxiliary is not None:
        _load_module(auxiliary, path / "auxiliary.safetensors", strict)
    if optimizer is not None:
        if not (path / "optimizer.json").is_file():
            raise CheckpointError(f"{path} holds no optimizer state")
        tensors, _ = load_tensors(path / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, read_json(path / "optimizer.json")))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({e})") from None
    if scheduler is not None:
        if not (path / "scheduler.json").is_file():
            raise CheckpointError(f"{path} holds no scheduler state")
        scheduler.load_state_dict(decode_state(read_json(path / "scheduler.json"), {}))
    if restore_rng:
        tensors, meta = load_tensors(path / "rng.safetensors")
        restore_rng_state(tensors, json.loads(meta[_RNG_META]))
    return CheckpointState.from_dict(read_json(path / "state.json"))

