"""Crash-safe checkpoints made only of safetensors and JSON (nothing is ever unpickled).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-<global_step:08d>/`` (format 2):

===========================  ===========================================================
``model.safetensors``        student (or trained model) weights: full tensors in the TP=1
                             layout, by state-dict name (fp32 masters where DeepSpeed keeps them)
``auxiliary.safetensors``    trainable method parameters (the auxiliary model), likewise
``optimizer.safetensors``    per-element optimizer state, full tensors ``<key>.<param>``:
                             ``exp_avg.model.<name>``, ``exp_avg_sq.auxiliary.<name>``
``optimizer.json``           step counts by parameter, state keys, param groups' hyper-parameters
``scheduler.json``           LR scheduler state
``rng.safetensors``          every rank's torch CPU/CUDA, numpy, python and megatron RNG states
``state.json``               :class:`CheckpointState` (steps, data position, method states,
                             metrics, teacher hashes)
``config.json``              the fully defaulted run config, when given
``COMPLETE``                 written last: format version, every file's size, the writing layout
===========================  ===========================================================

The files are the same whatever the layout that wrote them (tensor parallelism, data
parallelism, ZeRO stage, offload; :mod:`gkd.parallel.fullstate` gathers and cuts), so a
checkpoint resumes under another layout. Saving and loading are collective under a
multi-process job: every rank takes part, global rank 0 alone writes, every rank reads.

A checkpoint is written into ``step-<n>.tmp-<pid>``, every file and the directory are
fsynced, and only then is it renamed to its final name; ``latest`` (a pointer for people and
tools) is replaced atomically afterwards. A crash at any point leaves the previous checkpoint
intact, and :func:`find_latest` only considers directories with a ``COMPLETE`` marker.
Format 1 checkpoints (older gkd: the writing rank's tensors, optimizer state by parameter
index) are still read when they fit.
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

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from gkd.atomic import atomic_write_bytes, fsync_dir
from gkd.engine.serialize import (
    _RNG_META,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    decode_state,
    encode_state,
    load_tensors,
    open_tensors,
    read_json,
    restore_rng_state,
    unflatten_optimizer_state,
    write_json,
    write_safetensors,
)
from gkd.parallel import fullstate, zero
from gkd.parallel import state as pstate
from gkd.parallel.rng import megatron_rng_states, restore_megatron_rng

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


def _gather_weights(obj: nn.Module | Mapping[str, torch.Tensor] | None, *, keep: bool,
                    partitioned: bool) -> dict[str, torch.Tensor]:
    if obj is None:
        return {}
    if isinstance(obj, nn.Module):
        return fullstate.gather_module(obj, keep=keep, partitioned=partitioned)
    return dict(obj)  # a state dict given as it is to be stored


def _gather_rng(*, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank's RNG streams (collective): tensors ``<rank>.<stream>`` and their JSON."""
    tensors, meta = capture_rng_state()
    layout = fullstate.layout()
    streams = megatron_rng_states() if pstate.is_initialized() else {}
    tensors |= {f"megatron.{k}": torch.tensor(v, dtype=torch.uint8) for k, v in streams.items()}
    meta |= {"tensor_parallel": layout["tensor_parallel"], "tp_rank": layout["tp_rank"], "megatron": sorted(streams)}
    blobs = fullstate.all_gather_bytes(safetensors.torch.save(tensors))
    metas = fullstate.all_gather_bytes(json.dumps(meta).encode())
    if not keep:
        return {}, {}
    out = {f"{r}.{k}": v for r, blob in enumerate(blobs) for k, v in safetensors.torch.load(blob).items()}
    return out, {"ranks": [json.loads(m) for m in metas]}


def _rank_zero_succeeded(ok: bool) -> bool:
    """Whether the writer (global rank 0) succeeded, on every rank (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def save_checkpoint(run_dir: Path, state: CheckpointState, *, model: nn.Module | Mapping[str, torch.Tensor],
                    auxiliary: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    optimizer: Any | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    config: Mapping[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write a checkpoint atomically, point ``latest`` at it and prune old ones.

    Collective in a multi-process job: every rank calls it with its own part of the models and
    optimizer; the full tensors are gathered to global rank 0, which alone writes; every rank
    returns once the checkpoint is complete (or raises when rank 0 could not write it).

    Args:
        run_dir: The run directory (checkpoints go to ``<run_dir>/checkpoints``).
        state: Steps, data position, method states, metrics and teacher hashes.
        model: The trained model, or a state dict of full tensors.
        auxiliary: Method parameters (module or state dict).
        optimizer: Its state is saved when given: a torch optimizer, or the one DeepSpeed
            returned (ZeRO 1-3 included); its parameters must belong to ``model``/``auxiliary``.
        scheduler: Its state is saved when given.
        config: The run config, saved as ``config.json``.
        keep_last: Keep only this many complete checkpoints (the new one always survives).

    Returns:
        The final checkpoint directory.

    Raises:
        CheckpointError: A state that cannot be stored (e.g. non-JSON method state).
    """
    try:
        state_json = json.loads(json.dumps(state.to_dict()))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint state is not JSON-serialisable ({e}); method states must be "
                              f"plain JSON") from None
    writer = fullstate.rank() == 0
    partitioned = optimizer is not None and zero.partitioned_kind(optimizer) is not None
    weights = _gather_weights(model, keep=writer, partitioned=partitioned)
    aux = _gather_weights(auxiliary, keep=writer, partitioned=partitioned)
    opt: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    if optimizer is not None:
        modules = [m if isinstance(m, nn.Module) else None for m in (model, auxiliary)]
        try:
            opt = fullstate.gather_optimizer(optimizer, fullstate.qualified_parameters(*modules),
                                             fullstate.qualified_rules(*modules), keep=writer)
        except ValueError as e:
            raise CheckpointError(f"cannot save the optimizer state: {e}") from None
    rng_tensors, rng_meta = _gather_rng(keep=writer)
    final = checkpoint_dir(run_dir, state.global_step)
    layout = {k: v for k, v in fullstate.layout().items() if k != "tp_rank"} | {
        "optimizer": type(optimizer).__name__ if optimizer is not None else None}
    error: BaseException | None = None
    if writer:
        try:
            _write(Path(run_dir), final, state_json, weights, aux, opt, scheduler, (rng_tensors, rng_meta), config,
                   layout, keep_last)
        except BaseException as e:  # the other ranks must hear of it before rank 0 raises
            error = e
    if not _rank_zero_succeeded(error is None):
        if error is not None:
            raise error
        raise CheckpointError(f"global rank 0 could not write the checkpoint {final} (see its error)")
    return final


def _write(run_dir: Path, final: Path, state: dict[str, Any], weights: Mapping[str, torch.Tensor],
           aux: Mapping[str, torch.Tensor], opt: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
           scheduler: Any, rng: tuple[dict[str, torch.Tensor], dict[str, Any]], config: Mapping[str, Any] | None,
           layout: dict[str, Any], keep_last: int | None) -> None:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    old = root / f"{final.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", weights)
        write_safetensors(tmp / "auxiliary.safetensors", aux)
        if opt is not None:
            write_safetensors(tmp / "optimizer.safetensors", opt[0])
            write_json(tmp / "optimizer.json", {"format": FORMAT_VERSION, **opt[1]})
        if scheduler is not None:
            write_json(tmp / "scheduler.json", encode_state(scheduler.state_dict(), "scheduler", None))
        write_safetensors(tmp / "rng.safetensors", rng[0], {_RNG_META: json.dumps(rng[1])})
        write_json(tmp / "state.json", state)
        if config is not None:
            write_json(tmp / "config.json", dict(config))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        write_json(tmp / COMPLETE, {"format": FORMAT_VERSION, "global_step": state["global_step"], "files": files,
                                    "layout": layout})
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


def _load_module(module: nn.Module, path: Path, strict: bool, partitioned: bool) -> None:
    with open_tensors(path) as (names, read):
        try:
            fullstate.load_module(module, read, names, strict=strict, partitioned=partitioned)
        except ValueError as e:
            raise CheckpointError(f"{path} does not fit the model: {e}") from None


def _load_optimizer(path: Path, fmt: int, optimizer: Any, model: nn.Module | None,
                    auxiliary: nn.Module | None) -> None:
    if not (path / "optimizer.json").is_file():
        raise CheckpointError(f"{path} holds no optimizer state" + (
            " (an older gkd did not save it under ZeRO 1-3); set checkpoint.resume: false to start over"
            if fmt < 2 else ""))
    meta = read_json(path / "optimizer.json")
    if fmt < 2:  # by parameter index: only into the same plain optimizer
        if zero.partitioned_kind(optimizer) is not None:
            raise CheckpointError(f"{path} (checkpoint format {fmt}) holds optimizer state that only a ZeRO stage 0 "
                                  "run can read")
        tensors, _ = load_tensors(path / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({e})") from None
        return
    if model is None and auxiliary is None:
        raise CheckpointError("loading optimizer state needs the model (its parameter names)")
    with open_tensors(path / "optimizer.safetensors") as (_, read):
        try:
            fullstate.load_optimizer(optimizer, fullstate.qualified_parameters(model, auxiliary),
                                     fullstate.qualified_rules(model, auxiliary), read, meta)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({e})") from None


def _restore_rng(path: Path, fmt: int, state: Mapping[str, Any]) -> None:
    tensors, meta = load_tensors(path / "rng.safetensors")
    saved = json.loads(meta[_RNG_META])
    if fmt < 2:  # one stream set for every rank; megatron's in state.json
        restore_rng_state(tensors, saved)
        restore_megatron_rng(state.get("extra", {}).get("megatron_rng", {}))
        return
    ranks = saved["ranks"]
    rank = fullstate.rank()
    src = rank if rank < len(ranks) else 0
    mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(src)}
    restore_rng_state(mine, ranks[src])
    here = fullstate.layout()
    # megatron's streams differ between TP ranks: only a rank of the same TP position continues one.
    if (ranks[src]["tensor_parallel"], ranks[src]["tp_rank"]) == (here["tensor_parallel"], here["tp_rank"]):
        restore_megatron_rng({k: mine[f"megatron.{k}"].tolist() for k in ranks[src]["megatron"]})


def load_checkpoint(path: Path, *, model: nn.Module | None = None, auxiliary: nn.Module | None = None,
                    optimizer: Any | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    restore_rng: bool = True, strict: bool = True) -> CheckpointState:
    """Restore what is given from a checkpoint directory, using only safetensors and JSON.

    Every rank reads the files and keeps its own part, in its own layout (which may differ
    from the writer's); collective when DeepSpeed partitions the weights (ZeRO-3).

    Args:
        path: A complete checkpoint directory (e.g. from :func:`find_latest`).
        model: Receives ``model.safetensors``.
        auxiliary: Receives ``auxiliary.safetensors``.
        optimizer: Receives the optimizer state (a torch optimizer or DeepSpeed's, built over
            the parameters of ``model`` and ``auxiliary``; under DeepSpeed pass it so that
            the fp32 master weights are set too).
        scheduler: Receives the scheduler state.
        restore_rng: Also restore the torch/numpy/python/megatron RNG states (rank ``r`` takes
            the streams rank ``r`` saved; megatron's only under the same TP position).
        strict: Refuse missing or unexpected weights (as ``load_state_dict``).

    Returns:
        The saved :class:`CheckpointState`.

    Raises:
        CheckpointError: Incomplete or damaged checkpoint, or state that does not fit.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker or state.json)")
    marker = read_json(path / COMPLETE)
    fmt = int(marker.get("format", 0))
    if fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer gkd (checkpoint format {marker['format']}, "
                              f"this one reads up to {FORMAT_VERSION})")
    for name, size in marker.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has "
                                  f"{'no file' if actual is None else f'{actual} bytes'}, expected {size} bytes")
    partitioned = optimizer is not None and zero.partitioned_kind(optimizer) is not None
    if model is not None:
        _load_module(model, path / "model.safetensors", strict, partitioned)
    if auxiliary is not None:
        _load_module(auxiliary, path / "auxiliary.safetensors", strict, partitioned)
    if optimizer is not None:
        _load_optimizer(path, fmt, optimizer, model, auxiliary)
    if scheduler is not None:
        if not (path / "scheduler.json").is_file():
            raise CheckpointError(f"{path} holds no scheduler state")
        scheduler.load_state_dict(decode_state(read_json(path / "scheduler.json"), {}))
    state = read_json(path / "state.json")
    if restore_rng:
        _restore_rng(path, fmt, state)
    return CheckpointState.from_dict(state)


def checkpoint_layout(path: Path) -> dict[str, Any]:
    """The layout that wrote a checkpoint (``world_size``, ``tensor_parallel``, ``data_parallel``,
    ``optimizer``: the class holding the optimizer state, e.g. ``DeepSpeedZeroOptimizer_Stage3``);
    empty for format 1."""
    return dict(read_json(Path(path) / COMPLETE).get("layout", {}))
