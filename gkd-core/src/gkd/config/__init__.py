"""Run configuration: schema, loading (YAML/JSON + ``--set``), validation, typed view."""

from gkd.config.errors import ConfigError, ConfigIssue
from gkd.config.run import (
    DatasetConfig,
    MethodEntry,
    ParallelConfig,
    RunConfig,
    StageConfig,
    StudentInit,
    TeacherConfig,
    ZeroConfig,
)
from gkd.config.schema import apply_defaults, defaults_of, run_schema
from gkd.config.validate import build_run_config, check_config, load_run_config

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "DatasetConfig",
    "MethodEntry",
    "ParallelConfig",
    "RunConfig",
    "StageConfig",
    "StudentInit",
    "TeacherConfig",
    "ZeroConfig",
    "apply_defaults",
    "build_run_config",
    "check_config",
    "defaults_of",
    "load_run_config",
    "run_schema",
]
