"""Finding the point a run continues from, and checking that it may.

A run resumes from the newest complete checkpoint in its ``run_dir`` unless
``checkpoint.resume`` is false (then old checkpoints are removed). It refuses a checkpoint
written by a different config (sections in :data:`RESUME_INDEPENDENT` and `teachers[].offload` may change; so may stages
the checkpoint had not reached, and a chain may start over after its finished links, see
:func:`find_resume_point`) or with teachers whose weights changed since.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gkd.config.run import RunConfig
from gkd.engine import checkpoint as ckpt
from gkd.engine.data import BatchIterator
from gkd.engine.fingerprint import teacher_references, verify_teachers
from gkd.engine.step import SelectedMethod
from gkd.errors import GkdError
from gkd.parallel.rng import restore_megatron_rng

RESUME_INDEPENDENT = ("logging", "checkpoint", "export")
"""Config sections that may change between a run and its resumption."""


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to continue from, and its saved state."""

    path: Path
    state: ckpt.CheckpointState

    @property
    def teacher_paths(self) -> dict[str, Path]:
        return {k: Path(v) for k, v in self.state.extra.get("teacher_paths", {}).items()}

    @property
    def optimizer_saved(self) -> bool:
        return bool(self.state.extra.get("optimizer_saved", True))


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Paths where two configs differ (sections in :data:`RESUME_INDEPENDENT` ignored at the top)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            if not path and key in RESUME_INDEPENDENT:
                continue
            if key == "offload" and path.startswith("teachers["):
                continue  # where a frozen teacher waits between forwards does not change any result
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


def find_resume_point(run: RunConfig, echo: Callable[[str], None],
                      may_start_over: Callable[[int], bool] | None = None) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start from the beginning.

    A checkpoint of a config that differs only in stages it had not reached yet is resumed.
    When a stage it had reached changed, the run starts over (the checkpoints are removed) if
    ``may_start_over(first changed stage)`` says so — the trainer does when finished links of a
    teacher-assistant chain before that stage can be reused; otherwise it is refused.

    Raises:
        GkdError: The newest checkpoint belongs to a different config.
        CheckpointError: A teacher's weights changed since the checkpoint.
    """
    checkpoints = run.run_dir / ckpt.CHECKPOINTS
    if not run.checkpoint.resume:
        if checkpoints.exists():  # starting over: older steps must not mix with the new ones
            echo(f"checkpoint.resume is false: removing the old checkpoints in {checkpoints}")
            shutil.rmtree(checkpoints)
        return None
    path = ckpt.find_latest(run.run_dir)
    if path is None:
        return None
    saved = json.loads((path / "config.json").read_text())
    point = ResumePoint(path, ckpt.CheckpointState.from_dict(json.loads((path / "state.json").read_text())))
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
            shutil.rmtree(checkpoints)
            return None
        else:
            raise GkdError(
                f"{run.run_dir} holds checkpoints of a different config (changed: {listed}); use another run_dir, "
                "or set checkpoint.resume: false to start over (fine-tuned teachers and finished teacher-assistant "
                "links are still reused)"
            )
    verify_teachers(point.state.teachers, teacher_references(point.teacher_paths))
    return point


def restore_training(point: ResumePoint, *, model: nn.Module, auxiliary: nn.Module, optimizer: Any, scheduler: Any,
                     iterator: BatchIterator, methods: Mapping[str, SelectedMethod]) -> int:
    """Load a mid-stage checkpoint into the stage's objects; returns the stage iteration to continue at."""
    saved = point.optimizer_saved
    ckpt.load_checkpoint(point.path, model=model, auxiliary=auxiliary, optimizer=optimizer if saved else None,
                         scheduler=scheduler, restore_rng=True)
    restore_megatron_rng(point.state.extra.get("megatron_rng", {}))
    iterator.load_state_dict(point.state.data_position)
    for name, sel in methods.items():
        sel.state = dict(point.state.method_states.get(name, sel.state))
    return point.state.stage_iteration


def restore_finished_stage(point: ResumePoint, student: nn.Module) -> None:
    """A checkpoint taken at the end of its stage: the student's weights and every RNG stream."""
    ckpt.load_checkpoint(point.path, model=student, restore_rng=True, strict=True)
    restore_megatron_rng(point.state.extra.get("megatron_rng", {}))


__all__ = ["RESUME_INDEPENDENT", "ResumePoint", "config_differences", "find_resume_point", "first_changed_stage",
           "restore_finished_stage", "restore_training"]
