"""Finding the point a run continues from, and checking that it may.

A run resumes from the newest complete checkpoint in its ``run_dir`` unless
``checkpoint.resume`` is false (then old checkpoints are removed). It refuses a checkpoint
written by a different config (sections in :data:`RESUME_INDEPENDENT`, ``teachers[].offload`` and
``teachers[].partition`` may change; so may stages the checkpoint had not reached, and a chain
may start over after its finished links, see :func:`find_resume_point`) or with teachers whose
weights changed since.

The ``parallel`` section may change: checkpoints hold full tensors (:mod:`gkd.engine.checkpoint`),
so a run written under TP=2 or DP=2 with ZeRO-k continues under TP=1 or DP=1 with the same weights
and optimizer moments. When the data-parallel size changes, the data position is carried over in
examples (:func:`translate_data_position`): the union of the DP ranks' micro-batches of a step is
a contiguous slice of the epoch's order, so the run continues with the next unseen example. With
``training.batch_size`` per rank unchanged, the global batch changes with the number of ranks;
the run says so and continues.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gkd import parallel
from gkd.config.run import RunConfig
from gkd.engine import checkpoint as ckpt
from gkd.engine.data import BatchIterator, epoch_batches
from gkd.engine.fingerprint import teacher_references, verify_teachers
from gkd.engine.serialize import read_json
from gkd.engine.step import SelectedMethod
from gkd.errors import GkdError
from gkd.parallel import fullstate

RESUME_INDEPENDENT = ("logging", "checkpoint", "export", "parallel", "analysis")
"""Config sections that may change between a run and its resumption (``parallel``: how the run is
laid out over processes, not what it computes; ``analysis``: what is measured, not what is trained)."""


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to continue from, and its saved state."""

    path: Path
    state: ckpt.CheckpointState
    verified: bool = False
    """Every file's sha256 was checked when the point was found (loading then checks sizes only)."""

    @property
    def teacher_paths(self) -> dict[str, Path]:
        return {k: Path(v) for k, v in self.state.extra.get("teacher_paths", {}).items()}

    @property
    def layout(self) -> dict[str, Any]:
        """The writing job's ``world_size``, ``tensor_parallel`` and ``data_parallel`` (empty for
        checkpoint format 1)."""
        return ckpt.checkpoint_layout(self.path)


def describe_layout(tensor_parallel: int, data_parallel: int, zero: Mapping[str, Any] | None) -> str:
    """``TP=2 × DP=1, ZeRO 2 + optimizer offload`` (for messages)."""
    zero = zero or {}
    offload = [what for what in ("optimizer", "param") if zero.get(f"offload_{what}")]
    extra = "".join(f" + {what} offload" for what in offload)
    return f"TP={tensor_parallel} × DP={data_parallel}, ZeRO {zero.get('stage', 0)}{extra}"


def data_position(iterator: BatchIterator) -> dict[str, Any]:
    """``iterator.state_dict()`` plus ``examples``: how many examples of the current epoch's
    order all data-parallel ranks together have taken (what a resumed run under another
    data-parallel size continues after)."""
    state: dict[str, Any] = dict(iterator.state_dict())
    taken = state["index"] * state["batch_size"] * state["world_size"]
    return state | {"examples": min(taken, state["num_examples"])}


def translate_data_position(saved: Mapping[str, Any], iterator: BatchIterator) -> tuple[dict[str, Any], str | None]:
    """A saved data position for ``iterator``'s data-parallel size, and a line saying what changed.

    Data-parallel rank r takes every d-th example of the epoch's order, so the ranks' micro-batches
    of step i together are the slice ``[i·B·d, (i+1)·B·d)`` of it (B: micro-batch per rank): a
    position is a number of examples, valid under any size whose ``B·d`` divides it.

    Raises:
        GkdError: The position falls inside a step of the new layout (one line).
    """
    current, before = iterator.world_size, int(saved.get("world_size", iterator.world_size))
    if before == current:
        return dict(saved), None
    size, epoch, index = int(saved["batch_size"]), int(saved["epoch"]), int(saved["index"])
    taken = index * size * before
    if index >= epoch_batches(int(saved["num_examples"]), size, world_size=before, drop_last=iterator.drop_last):
        moved = iterator.batches_per_epoch  # the epoch was finished: so it is in the new layout
    elif taken % (size * current):
        raise GkdError(f"cannot continue the data position under data-parallel size {current}: the checkpoint had "
                       f"taken {taken} examples of epoch {epoch}, not a multiple of {size * current} (training."
                       f"batch_size {size} × {current} ranks); resume with data-parallel size {before}")
    else:
        moved = taken // (size * current)
    line = (f"data-parallel size {before} → {current}: the data continues after example {min(taken, int(saved['num_examples']))} "
            f"of epoch {epoch}; with training.batch_size {size} per rank a micro-step now takes {size * current} "
            f"examples instead of {size * before}")
    return dict(saved) | {"index": moved, "world_size": current}, line


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Paths where two configs differ (sections in :data:`RESUME_INDEPENDENT` ignored at the top)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            if not path and key in RESUME_INDEPENDENT:
                continue
            if key in ("offload", "partition") and path.startswith("teachers["):
                continue  # where a frozen teacher's weights wait between forwards does not change any result
            sub = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(sub)
            else:
                out += config_differences(saved[key], current[key], sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True)) for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [path]


def first_changed_stage(saved: Any, current: Any) -> int | None:
    """The first stage whose config differs when nothing but ``stages`` does (sections in
    :data:`RESUME_INDEPENDENT` aside); None when something outside ``stages`` differs, or nothing."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return None
    rest_saved = {k: v for k, v in saved.items() if k != "stages"}
    rest_current = {k: v for k, v in current.items() if k != "stages"}
    a, b = saved.get("stages"), current.get("stages")
    if config_differences(rest_saved, rest_current) or not isinstance(a, list) or not isinstance(b, list):
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if config_differences(x, y, f"stages[{i}]"):
            return i
    return min(len(a), len(b)) if len(a) != len(b) else None


def _remove_checkpoints(path: Path) -> None:
    """Remove a run's checkpoints once, after every rank has looked at them (ranks decide alike)."""
    parallel.barrier()
    if parallel.is_global_rank_zero():
        shutil.rmtree(path, ignore_errors=True)
    parallel.barrier()


def _intact_checkpoint(run_dir: Path, echo: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint (collective: global rank 0 cleans incomplete directories, checks
    the hashes, moves damaged checkpoints aside and says so; every rank gets its answer).

    Raises:
        CheckpointError: There are checkpoints but none is intact (one line listing each and why).
    """
    answer: dict[str, Any] = {}
    if parallel.is_global_rank_zero():
        try:
            removed = ckpt.clean_incomplete(run_dir)
            if removed:
                echo(f"removed {len(removed)} incomplete checkpoint director{'y' if len(removed) == 1 else 'ies'} "
                     f"left by a killed run: {', '.join(removed)}")
            path, damaged = ckpt.find_intact(run_dir)
            if damaged and path is None:
                answer["error"] = (f"no intact checkpoint in {Path(run_dir) / ckpt.CHECKPOINTS}: "
                                   + "; ".join(why for _, why in damaged)
                                   + "; remove them or set checkpoint.resume: false to start over")
            else:
                for bad, why in damaged:
                    aside = ckpt.set_aside(bad)
                    echo(f"{why}; moved it to {aside.name} and falling back to the previous checkpoint, {path}")
            answer["path"] = str(path) if path is not None else None
        except GkdError as e:  # every rank must hear of it, or the others would wait for rank 0
            answer["error"] = str(e)
        except OSError as e:
            answer["error"] = f"cannot inspect the checkpoints in {run_dir}: {e}"
    answer = json.loads(fullstate.all_gather_bytes(json.dumps(answer).encode())[0])
    if "error" in answer:
        raise ckpt.CheckpointError(answer["error"])
    return Path(answer["path"]) if answer["path"] is not None else None


def find_resume_point(run: RunConfig, echo: Callable[[str], None],
                      may_start_over: Callable[[int], bool] | None = None) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start from the beginning.

    A checkpoint of a config that differs only in stages it had not reached yet is resumed.
    When a stage it had reached changed, the run starts over (the checkpoints are removed) if
    ``may_start_over(first changed stage)`` says so — the trainer does when finished links of a
    teacher-assistant chain before that stage can be reused; otherwise it is refused.

    The newest checkpoint whose files match the sha256 recorded when it was written is used:
    damaged newer ones are moved aside (``step-<n>.damaged``), one line each saying why.
    Incomplete directories left by killed writers are removed first.

    Raises:
        GkdError: The newest checkpoint belongs to a different config.
        CheckpointError: A teacher's weights changed since the checkpoint, or no checkpoint is intact.
    """
    checkpoints = run.run_dir / ckpt.CHECKPOINTS
    if not run.checkpoint.resume:
        if checkpoints.exists():  # starting over: older steps must not mix with the new ones
            echo(f"checkpoint.resume is false: removing the old checkpoints in {checkpoints}")
            _remove_checkpoints(checkpoints)
        return None
    path = _intact_checkpoint(run.run_dir, echo)
    if path is None:
        return None
    saved = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    point = ResumePoint(path, ckpt.read_state(path), verified=True)
    changed = config_differences(saved, run.raw)
    if changed:
        listed = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        first = first_changed_stage(saved, run.raw)
        if first is not None and point.state.stage_index < first:
            echo(f"stages from stages[{first}] on changed since the checkpoint ({listed}); it had not reached them: "
                 "resuming")
        elif first is not None and may_start_over is not None and may_start_over(first):
            echo(f"stages[{first}] changed since the checkpoints ({listed}): starting over from the finished "
                 f"teacher-assistant links before it; removing the old checkpoints in {checkpoints}")
            _remove_checkpoints(checkpoints)
            return None
        else:
            raise GkdError(
                f"{run.run_dir} holds checkpoints of a different config (changed: {listed}); use another run_dir, "
                "or set checkpoint.resume: false to start over (fine-tuned teachers and finished teacher-assistant "
                "links are still reused)"
            )
    verify_teachers(point.state.teachers, teacher_references(point.teacher_paths))
    before, now = point.layout, fullstate.layout()
    if before and (before["tensor_parallel"], before["data_parallel"]) != (now["tensor_parallel"], now["data_parallel"]):
        was = describe_layout(before["tensor_parallel"], before["data_parallel"], saved.get("parallel", {}).get("zero"))
        is_ = describe_layout(now["tensor_parallel"], now["data_parallel"], run.raw.get("parallel", {}).get("zero"))
        echo(f"the checkpoint was written under {was}; continuing under {is_} with the same weights and optimizer state")
    return point


def restore_training(point: ResumePoint, *, model: nn.Module, auxiliary: nn.Module, optimizer: Any, scheduler: Any,
                     iterator: BatchIterator, methods: Mapping[str, SelectedMethod],
                     echo: Callable[[str], None] | None = None) -> int:
    """Load a mid-stage checkpoint into the stage's objects (collective: every rank, its own part);
    returns the stage iteration to continue at.

    Raises:
        CheckpointError: The checkpoint does not fit the models or optimizer.
        GkdError: The data position cannot be carried over to this data-parallel size.
    """
    position, line = translate_data_position(point.state.data_position, iterator)
    ckpt.load_checkpoint(point.path, model=model, auxiliary=auxiliary, optimizer=optimizer, scheduler=scheduler,
                         restore_rng=True, verify=not point.verified)
    iterator.load_state_dict(position)
    if line is not None and echo is not None:
        echo(line)
    for name, sel in methods.items():
        sel.state = dict(point.state.method_states.get(name, sel.state))
    return point.state.stage_iteration


def restore_finished_stage(point: ResumePoint, student: nn.Module) -> None:
    """A checkpoint taken at the end of its stage: the student's weights and every RNG stream."""
    ckpt.load_checkpoint(point.path, model=student, restore_rng=True, strict=True, verify=not point.verified)


__all__ = ["RESUME_INDEPENDENT", "ResumePoint", "config_differences", "data_position", "describe_layout",
           "find_resume_point", "first_changed_stage", "restore_finished_stage", "restore_training",
           "translate_data_position"]
