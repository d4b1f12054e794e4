"""Run configuration: schema, loading (YAML/JSON + ``--set``), validation, typed view.

``load_run_config(path, overrides)`` is the entry point; the result is a frozen
:class:`RunConfig` whose sections are the dataclasses of :mod:`gkd.config.run`.
"""

from gkd.config.build import build_run_config, load_run_config
from gkd.config.errors import ConfigError, ConfigIssue
from gkd.config.run import (
    ArchitectureOverrides,
    CheckpointConfig,
    DatasetConfig,
    ExportConfig,
    LoggingConfig,
    MethodEntry,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    StageConfig,
    StudentConfig,
    StudentInit,
    TaskConfig,
    TeacherConfig,
    TrainingConfig,
    ZeroConfig,
)
from gkd.config.schema import apply_defaults, defaults_of, run_schema
from gkd.config.validate import check_config

__all__ = [
    "ArchitectureOverrides",
    "CheckpointConfig",
    "ConfigError",
    "ConfigIssue",
    "DatasetConfig",
    "ExportConfig",
    "LoggingConfig",
    "MethodEntry",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "ScheduleConfig",
    "StageConfig",
    "StudentConfig",
    "StudentInit",
    "TaskConfig",
    "TeacherConfig",
    "TrainingConfig",
    "ZeroConfig",
    "apply_defaults",
    "build_run_config",
    "check_config",
    "defaults_of",
    "load_run_config",
    "run_schema",
]
