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
                             (and torch's CPU thread count, restored with them)
``state.json``               :class:`CheckpointState` (steps, data position, method states,
                             metrics, teacher hashes)
``config.json``              the fully defaulted run config, when given
``COMPLETE``                 written last: format version, every file's size and sha256, the
                             writing layout
===========================  ===========================================================

The files are the same whatever the layout that wrote them (tensor parallelism, data
parallelism, ZeRO stage, offload; :mod:`gkd.parallel.fullstate` gathers and cuts), so a
checkpoint resumes under another layout. Saving and loading are collective under a
multi-process job: every rank takes part, global rank 0 alone writes, every rank reads.

A checkpoint is written into ``step-<n>.tmp-<pid>``, every file and the directory are
fsynced, and only then is it renamed to its final name; ``latest`` (a pointer for people and
tools) is replaced atomically afterwards. A crash at any point leaves the previous checkpoint
intact, and :func:`find_latest` only considers directories with a ``COMPLETE`` marker. Pruning
renames a checkpoint to ``step-<n>.del-<pid>`` before deleting it, so a crash there leaves no
half-deleted checkpoint; :func:`clean_incomplete` removes what killed writers left behind.

Every file's sha256 is recorded in ``COMPLETE`` at write time and checked on load
(:func:`verify_checkpoint`): a truncated, bit-flipped or edited file is refused in one line, and
:func:`find_intact` skips to the newest checkpoint that is intact. Markers of older gkd (sizes,
no hashes) are still read, with their sizes checked. Format 1 checkpoints (older gkd: the writing
rank's tensors, optimizer state by parameter index) are still read when they fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
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
    sha256_file,
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
_LEFTOVER = re.compile(r"^(step-\d{8,})\.(tmp|old|del)-(\d+)$")
_POINTER_LEFTOVER = re.compile(rf"^\.{LATEST}\.tmp-(\d+)$")  # gkd.atomic's temp name of ``latest``
DAMAGED_SUFFIX = ".damaged"
_STATE_INTS = ("global_step", "stage_index", "stage_iteration")
_STATE_OBJECTS = ("data_position", "method_states", "metrics", "teachers", "extra")
_POSITION_INTS = ("epoch", "index", "seed", "num_examples", "batch_size", "world_size", "examples")


class NewerFormatError(CheckpointError):
    """A checkpoint written by a newer gkd: not damaged, so never skipped for an older one."""


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    def from_dict(cls, data: Any, source: str = "state.json") -> CheckpointState:
        """The state saved as ``data`` (parsed ``state.json``).

        Raises:
            CheckpointError: A field is missing or of the wrong type (one line naming ``source``
                and the field).
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {_json_kind(data)}")
        if "global_step" not in data:
            raise CheckpointError(f"{source}: global_step is missing")
        for key in _STATE_INTS:
            if key in data and not _natural(data[key]):
                raise CheckpointError(f"{source}: {key} must be a non-negative integer, got {json.dumps(data[key])}")
        for key in _STATE_OBJECTS:
            if key in data and not isinstance(data[key], dict):
                raise CheckpointError(f"{source}: {key} must be an object, got {_json_kind(data[key])}")
        for key in _POSITION_INTS:
            value = data.get("data_position", {}).get(key)
            if value is not None and not _natural(value):
                raise CheckpointError(f"{source}: data_position.{key} must be a non-negative integer, got "
                                      f"{json.dumps(value)}")
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
    # Renamed out of the step-<n> namespace first (atomic): a crash mid-delete leaves a
    # step-<n>.del-<pid> directory that clean_incomplete removes, never a half checkpoint.
    doomed = path.with_name(f"{path.name}.del-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


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
    meta |= {"tensor_parallel": layout["tensor_parallel"], "tp_rank": layout["tp_rank"], "megatron": sorted(streams),
             "threads": torch.get_num_threads()}
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
        written = sorted(tmp.iterdir())
        files = {p.name: p.stat().st_size for p in written}
        hashes = _sha256_files(written)
        write_json(tmp / COMPLETE, {"format": FORMAT_VERSION, "global_step": state["global_step"], "files": files,
                                    "sha256": hashes, "layout": layout})
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


def _sha256_files(paths: list[Path]) -> dict[str, str]:
    """Every file's sha256, files hashed in parallel (hashlib releases the GIL on large reads); the
    files were just written, so they are read back from the page cache."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1, 8))) as pool:
        return dict(zip((p.name for p in paths), pool.map(sha256_file, paths), strict=True))


def _clean_leftovers(root: Path) -> list[str]:
    """Remove what writers that died mid-save or mid-prune left (a live writer's is kept); a
    checkpoint moved aside to be re-saved (``.old-<pid>``) whose replacement never arrived is put
    back. Returns the names removed."""
    removed = []
    for p in sorted(root.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir() or (int(m.group(3)) != os.getpid() and _pid_alive(int(m.group(3)))):
            continue
        final = root / m.group(1)
        if m.group(2) == "old" and not final.exists() and is_complete(p):
            os.rename(p, final)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def clean_incomplete(run_dir: Path) -> list[str]:
    """Remove incomplete checkpoint directories: temp, half-pruned and moved-aside directories of
    writers that are gone, and ``step-<n>`` directories without a ``COMPLETE`` marker or
    ``state.json``. Global rank 0 only, before a run looks for its checkpoints. Returns the names
    removed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = _clean_leftovers(root)
    for p in sorted(root.iterdir()):
        if _STEP_DIR.match(p.name) and p.is_dir() and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif (m := _POINTER_LEFTOVER.match(p.name)) and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        fsync_dir(root)
    return removed


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
    threads = ranks[src].get("threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        # CPU kernels split reductions by thread: the writer's count keeps the resumed run bitwise.
        torch.set_num_threads(threads)
    here = fullstate.layout()
    # megatron's streams differ between TP ranks: only a rank of the same TP position continues one.
    if (ranks[src]["tensor_parallel"], ranks[src]["tp_rank"]) == (here["tensor_parallel"], here["tp_rank"]):
        restore_megatron_rng({k: mine[f"megatron.{k}"].tolist() for k in ranks[src]["megatron"]})


def _marker(path: Path) -> dict[str, Any]:
    """The parsed ``COMPLETE`` marker, its fields' types checked."""
    where = path / COMPLETE
    marker = read_json(where)
    if not isinstance(marker, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {_json_kind(marker)}")
    fmt = marker.get("format", 0)
    if not _natural(fmt):
        raise CheckpointError(f"{where}: format must be a non-negative integer, got {json.dumps(fmt)}")
    if fmt > FORMAT_VERSION:
        raise NewerFormatError(f"{path} was written by a newer gkd (checkpoint format {fmt}, this one reads up to "
                               f"{FORMAT_VERSION}); update gkd to continue it")
    files, hashes = marker.get("files", {}), marker.get("sha256")
    if not isinstance(files, dict) or not all(_natural(v) for v in files.values()):
        raise CheckpointError(f"{where}: files must map file names to sizes in bytes")
    if hashes is not None and (not isinstance(hashes, dict) or set(hashes) != set(files)
                               or not all(isinstance(v, str) for v in hashes.values())):
        raise CheckpointError(f"{where}: sha256 must map the same file names as files to hex digests")
    if not isinstance(marker.get("layout", {}), dict):
        raise CheckpointError(f"{where}: layout must be an object, got {_json_kind(marker['layout'])}")
    return marker


def verify_checkpoint(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check that a checkpoint is complete and undamaged; returns its ``COMPLETE`` marker.

    Every file the marker lists must exist with its recorded size and (``hashes``, when the
    marker records them; markers of older gkd hold sizes only) its recorded sha256; the JSON
    files must parse, ``state.json`` into a well-typed state.

    Raises:
        CheckpointError: One line naming the checkpoint, the file and what is wrong.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker or state.json)")
    marker = _marker(path)
    files: dict[str, int] = marker.get("files", {})
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has "
                                  f"{'no file' if actual is None else f'{actual} bytes'}, expected {size} bytes")
    digests = marker.get("sha256") or {}
    if hashes and digests:
        actual_digests = _sha256_files([path / name for name in files])
        for name in files:
            if actual_digests[name] != digests[name]:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match the sha256 recorded "
                                      "when it was written")
    for name in marker.get("files", {}):
        if name.endswith(".json") and name != "state.json":
            if not isinstance(data := read_json(path / name), dict):
                raise CheckpointError(f"{path / name}: expected a JSON object, got {_json_kind(data)}")
    read_state(path)
    return marker


def read_state(path: Path) -> CheckpointState:
    """The :class:`CheckpointState` of a checkpoint directory (``state.json``, types checked).

    Raises:
        CheckpointError: Unreadable, invalid JSON or a wrong-typed field (one line).
    """
    where = Path(path) / "state.json"
    return CheckpointState.from_dict(read_json(where), str(where))


def find_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that passes :func:`verify_checkpoint`, and the newer ones
    that do not, with why (newest first).

    Raises:
        NewerFormatError: The newest checkpoint was written by a newer gkd (it is not damaged).
    """
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except NewerFormatError:
            raise
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        return path, damaged
    return None, damaged


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the ``step-<n>`` namespace (``step-<n>.damaged``, kept
    for inspection, never loaded or pruned); returns the new path. Global rank 0 only."""
    path = Path(path)
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def load_checkpoint(path: Path, *, model: nn.Module | None = None, auxiliary: nn.Module | None = None,
                    optimizer: Any | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    restore_rng: bool = True, strict: bool = True, verify: bool = True) -> CheckpointState:
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
        verify: Check every file's sha256 against the marker first; False checks sizes only
            (for a checkpoint just verified, e.g. by :func:`find_intact`).

    Returns:
        The saved :class:`CheckpointState`.

    Raises:
        CheckpointError: Incomplete or damaged checkpoint, or state that does not fit.
    """
    path = Path(path)
    fmt = int(verify_checkpoint(path, hashes=verify).get("format", 0))
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
        try:
            scheduler.load_state_dict(decode_state(read_json(path / "scheduler.json"), {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path / 'scheduler.json'}: does not fit this scheduler ({e!r})") from None
    state = read_json(path / "state.json")
    if restore_rng:
        try:
            _restore_rng(path, fmt, state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'rng.safetensors'}: RNG states unreadable ({e!r})") from None
    return CheckpointState.from_dict(state, str(path / "state.json"))


def checkpoint_layout(path: Path) -> dict[str, Any]:
    """The layout that wrote a checkpoint (``world_size``, ``tensor_parallel``, ``data_parallel``,
    ``optimizer``: the class holding the optimizer state, e.g. ``DeepSpeedZeroOptimizer_Stage3``);
    empty for format 1."""
    return dict(_marker(Path(path)).get("layout", {}))
