"""From a config file to a typed :class:`~gkd.config.run.RunConfig`: read, ``--set``, validate
(every problem at once), then build the frozen dataclasses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from gkd.config import resolve
from gkd.config.errors import ConfigError
from gkd.config.loader import apply_overrides, read_config_file
from gkd.config.paths import resolve_path
from gkd.config.run import (
    AnalysisConfig,
    ArchitectureOverrides,
    CacheConfig,
    CheckpointConfig,
    DatasetConfig,
    EarlyStopping,
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
    WandbConfig,
    ZeroConfig,
)
from gkd.config.schema import apply_defaults, run_schema
from gkd.config.validate import check_config
from gkd.plugins.registry import MethodRegistry


def _dataset(raw: dict[str, Any] | None, base: Path) -> DatasetConfig | None:
    if raw is None:
        return None
    return DatasetConfig(resolve_path(raw["path"], base), raw["format"], raw["text_field"], raw["label_field"],
                         raw.get("limit"))


def _init(raw: dict[str, Any], base: Path) -> StudentInit:
    layers = raw["layers"]
    return StudentInit(strategy=raw["strategy"], path=resolve_path(raw["path"], base) if "path" in raw else None,
                       teacher=raw.get("teacher"), layers=tuple(layers) if isinstance(layers, list) else layers,
                       num_layers=raw.get("num_layers"))


def _stage(view: resolve.StageView, top: dict[str, Any], user_stage: dict[str, Any], base: Path,
           registry: MethodRegistry | None) -> StageConfig:
    s = view.raw
    teachers = tuple(view.teachers)
    methods = []
    listed = isinstance(s.get("teachers"), list)
    for m in s["methods"]:
        spec = registry.get(m["name"]).spec if registry is not None else None
        read = resolve.method_teachers(m, teachers, spec.kind if spec else None, stage_lists=listed)
        methods.append(MethodEntry(m["name"], float(m["weight"]), tuple(read),
                                   apply_defaults(spec.config_schema if spec else {}, m["config"])))
    data = s.get("data", {})
    optimizer = resolve.merged_section(top, user_stage, "optimizer")
    train_data = _dataset(data.get("train"), base) or _dataset(top["data"]["train"], base)
    assert train_data is not None
    return StageConfig(
        name=s["name"], kind=s["kind"], train=s["train"], teachers=teachers, methods=tuple(methods),
        steps=s.get("steps"), epochs=s.get("epochs"), train_data=train_data,
        eval_data=_dataset(data.get("eval"), base) or _dataset(top["data"].get("eval"), base),
        optimizer=OptimizerConfig(**(optimizer | {"betas": tuple(optimizer["betas"])})),
        schedule=ScheduleConfig(**resolve.merged_section(top, user_stage, "schedule")),
        training=_training(resolve.merged_section(top, user_stage, "training")),
        publish_as_teacher=s.get("publish_as_teacher"),
        student_init=_init(s["student_init"], base) if "student_init" in s else None,
        cache=CacheConfig.mode_of(s["cache"]) if "cache" in s else None,
    )


def _analysis(raw: dict[str, Any]) -> AnalysisConfig:
    layer_map = raw.get("layer_map")
    if isinstance(layer_map, dict):
        layer_map = {name: tuple(layers) for name, layers in layer_map.items()}
    elif layer_map is not None:
        layer_map = tuple(layer_map)
    return AnalysisConfig(every=raw["every"], probe_examples=raw["probe_examples"], probe_split=raw["probe_split"],
                          batch_size=raw["batch_size"], metric=raw["metric"],
                          teachers=tuple(raw["teachers"]) if "teachers" in raw else None, layer_map=layer_map,
                          temperatures=tuple(float(t) for t in raw["temperatures"]))


def _build(raw: dict[str, Any], user: dict[str, Any], base: Path, registry: MethodRegistry | None,
           source: Path | None) -> RunConfig:
    """``raw`` is the defaulted config; ``user`` the config as written (a stage's partial
    ``training`` block overrides only the keys it names)."""
    user_stages = user["stages"]
    stages = tuple(_stage(view, raw, user_stages[view.index], base, registry) for view in resolve.stages(raw))
    zero, export = raw["parallel"]["zero"], raw["export"]
    train_data = _dataset(raw["data"]["train"], base)
    assert train_data is not None
    return RunConfig(
        name=raw["name"],
        run_dir=Path(raw["run_dir"]).expanduser(),
        seed=raw["seed"],
        task=TaskConfig(**raw["task"]),
        teachers=tuple(TeacherConfig(t["name"], resolve_path(t["path"], base), t["dtype"], t["offload"], t["partition"])
                       for t in raw["teachers"]),
        student=StudentConfig(_init(raw["student"]["init"], base),
                              ArchitectureOverrides(**raw["student"].get("architecture", {}))),
        stages=stages,
        parallel=ParallelConfig(raw["parallel"]["tensor_parallel"], ZeroConfig(**zero), raw["parallel"]["data_parallel"],
                                float(raw["parallel"]["timeout_s"])),
        checkpoint=CheckpointConfig(**raw["checkpoint"]),
        logging=LoggingConfig(**{**raw["logging"], "wandb": WandbConfig.from_raw(raw["logging"].get("wandb"))}),
        export=ExportConfig(export["enabled"], Path(export["dir"]).expanduser() if export.get("dir") else None,
                            export["onnx"]),
        analysis=_analysis(raw["analysis"]),
        train_data=train_data,
        eval_data=_dataset(raw["data"].get("eval"), base),
        test_data=_dataset(raw["data"].get("test"), base),
        source=source,
        raw=raw,
        cache=CacheConfig.from_raw(raw["cache"], base),
    )


def build_run_config(raw: dict[str, Any], *, base_dir: Path, registry: MethodRegistry | None = None,
                     source: Path | None = None) -> RunConfig:
    """Validate ``raw`` and return the typed config, or raise :class:`ConfigError` with all issues.

    Args:
        raw: The config as read from its file (after ``--set``).
        base_dir: Relative paths resolve against it (the config file's directory).
        registry: Installed methods (for method schemas); None skips method checks.
        source: The config file, named in error messages.
    """
    issues = check_config(raw, base_dir, registry)
    if issues:
        raise ConfigError(issues, str(source) if source else None)
    return _build(apply_defaults(run_schema(), copy.deepcopy(raw)), raw, base_dir, registry, source)


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                    registry: MethodRegistry | None = None) -> RunConfig:
    """Read, override (``--set key=value``), validate and type a run config file.

    ``registry`` defaults to the process-wide plugin manager's registry.
    """
    if registry is None:
        from gkd.plugins.manager import get_plugin_manager

        registry = get_plugin_manager().registry
    source = Path(path)
    raw = read_config_file(source)
    issues = apply_overrides(raw, list(overrides))
    if issues:
        raise ConfigError(issues, str(source))
    return build_run_config(raw, base_dir=source.resolve().parent, registry=registry, source=source)


def _training(merged: dict[str, Any]) -> TrainingConfig:
    """A stage's ``training`` (top-level keys with the stage's own on top)."""
    return TrainingConfig(**{**merged, "early_stopping": EarlyStopping.from_raw(merged.get("early_stopping"))})


__all__ = ["build_run_config", "load_run_config"]

