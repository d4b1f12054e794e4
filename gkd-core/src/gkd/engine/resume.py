"""Finding the point a run continues from, and checking that it may.

A run resumes from the newest complete checkpoint in its ``run_dir`` unless
``checkpoint.resume`` is false (then old checkpoints are removed). It refuses a checkpoint
written by a different config (sections in :data:`RESUME_INDEPENDENT` may change) or with
teachers whose weights changed since.
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
            sub = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(sub)
            else:
                out += config_differences(saved[key], current[key], sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True)) for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [path]


def find_resume_point(run: RunConfig, echo: Callable[[str], None]) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start from the beginning.

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
    changed = config_differences(json.loads((path / "config.json").read_text()), run.raw)
    if changed:
        raise GkdError(
            f"{run.run_dir} holds checkpoints of a different config (changed: {', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}); use another run_dir, or set checkpoint.resume: false "
            "to start over (fine-tuned teachers are still reused)"
        )
    point = ResumePoint(path, ckpt.CheckpointState.from_dict(json.loads((path / "state.json").read_text())))
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


__all__ = ["RESUME_INDEPENDENT", "ResumePoint", "config_differences", "find_resume_point", "restore_finished_stage",
           "restore_training"]
