"""Typed, validated view of a run config. Build it with :func:`gkd.config.load_run_config`.

The JSON Schema (``run.schema.json``) is the source of truth for fields, defaults and their
documentation (``gkd config schema`` prints it); these dataclasses give the engine typed,
immutable access to a config that has already passed every check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]
TaskType = Literal["sequence_classification", "masked_lm", "causal_lm"]


@dataclass(frozen=True)
class DatasetConfig:
    path: Path
    format: str
    text_field: str
    label_field: str
    limit: int | None


@dataclass(frozen=True)
class TeacherConfig:
    name: str
    path: Path
    dtype: Precision


@dataclass(frozen=True)
class StudentInit:
    strategy: Literal["pretrained", "truncate", "random", "run"]
    path: Path | None
    teacher: str | None
    layers: str | tuple[int, ...]
    num_layers: int | None


@dataclass(frozen=True)
class MethodEntry:
    """One method selected in a stage, with its config already defaulted and validated."""

    name: str
    weight: float
    teachers: tuple[str, ...]
    config: dict[str, Any]


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False

    def to_deepspeed_dict(self) -> dict[str, Any]:
        """The ``zero_optimization`` section of a DeepSpeed config; the only place it is built."""
        out: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer:
            out["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_param:
            out["offload_param"] = {"device": "cpu", "pin_memory": False}
        return out


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    zero: ZeroConfig = field(default_factory=ZeroConfig)


@dataclass(frozen=True)
class StageConfig:
    name: str
    kind: Literal["pretrain", "task"]
    train: str
    """``"student"`` or ``"teacher:NAME"``."""
    teachers: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    steps: int | None
    epochs: float | None
    train_data: DatasetConfig
    eval_data: DatasetConfig | None
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    training: dict[str, Any]
    publish_as_teacher: str | None
    student_init: StudentInit | None

    @property
    def trains_teacher(self) -> str | None:
        return self.train.split(":", 1)[1] if self.train.startswith("teacher:") else None


@dataclass(frozen=True)
class RunConfig:
    name: str
    run_dir: Path
    seed: int
    task: dict[str, Any]
    teachers: tuple[TeacherConfig, ...]
    student_init: StudentInit
    student_architecture: dict[str, int]
    stages: tuple[StageConfig, ...]
    parallel: ParallelConfig
    checkpoint: dict[str, Any]
    logging: dict[str, Any]
    export: dict[str, Any]
    train_data: DatasetConfig
    """``data.train``: the default training split of every stage, and the source of the label set."""
    test_data: DatasetConfig | None
    source: Path | None
    raw: dict[str, Any]
    """The fully defaulted config as a plain mapping (saved next to every checkpoint)."""

    def teacher(self, name: str) -> TeacherConfig:
        return next(t for t in self.teachers if t.name == name)
