"""Config validation in three layers, all errors reported at once:

1. the run schema (types, ranges, unknown keys with "did you mean");
2. each selected method's own schema, under ``stages[i].methods[j].config``;
3. rules that span fields (references between teachers, stages and methods; tensor-parallel
   divisibility of every model's heads; paths that must exist) — checked by reading the
   checkpoints' ``config.json``, before any model is built.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from gkd.config.errors import ConfigError, ConfigIssue
from gkd.config.loader import apply_overrides, read_config_file
from gkd.config.paths import PathResolutionError, resolve_path
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
from gkd.config.schema import apply_defaults, closest, run_schema, schema_issues
from gkd.errors import GkdError
from gkd.plugins.registry import MethodRegistry

ENCODER_TYPES = {"bert"}
DECODER_TYPES = {"llama"}
"""The Hugging Face ``model_type`` values :mod:`gkd.models` reads (kept here so that validation
does not import megatron-core)."""


def _shape_from_hf(config_json: dict[str, Any]) -> dict[str, Any]:
    heads = config_json.get("num_attention_heads")
    return {
        "model_type": config_json.get("model_type", "?"),
        "num_layers": config_json.get("num_hidden_layers"),
        "hidden_size": config_json.get("hidden_size"),
        "num_heads": heads,
        "num_kv_heads": config_json.get("num_key_value_heads", heads),
        "ffn_hidden_size": config_json.get("intermediate_size"),
    }


class _Checker:
    def __init__(self, raw: dict[str, Any], base_dir: Path, registry: MethodRegistry | None) -> None:
        self.raw = raw
        self.base_dir = base_dir
        self.registry = registry
        self.issues: list[ConfigIssue] = []
        self.teacher_shapes: dict[str, dict[str, Any]] = {}

    def add(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(path, message))

    # ------------------------------------------------------------------ helpers

    def path(self, value: Any, where: str, *, must_exist: bool = True, kind: str = "file or directory") -> Path | None:
        if not isinstance(value, str):
            return None
        try:
            p = resolve_path(value, self.base_dir)
        except PathResolutionError as exc:
            self.add(where, str(exc))
            return None
        if must_exist and not p.exists():
            self.add(where, f"{kind} not found: {p}")
            return None
        return p

    def checkpoint_shape(self, value: Any, where: str) -> dict[str, Any] | None:
        p = self.path(value, where, kind="checkpoint directory")
        if p is None:
            return None
        cfg = p / "config.json"
        if not cfg.is_file():
            self.add(where, f"{p} has no config.json (expected a Hugging Face checkpoint directory)")
            return None
        try:
            shape = _shape_from_hf(json.loads(cfg.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            self.add(where, f"cannot read {cfg}: {exc}")
            return None
        if shape["model_type"] not in ENCODER_TYPES | DECODER_TYPES:
            self.add(where, f"model_type '{shape['model_type']}' in {cfg} is not supported "
                            f"(gkd reads {', '.join(sorted(ENCODER_TYPES | DECODER_TYPES))})")
            return None
        return shape

    # ------------------------------------------------------------------ sections

    def run(self) -> None:
        raw = self.raw
        self.issues.extend(schema_issues(run_schema(), raw))
        teachers = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
        self.check_teachers(teachers)
        self.check_data(raw.get("data"), "data")
        student = raw.get("student") if isinstance(raw.get("student"), dict) else {}
        student_shape = self.check_student_init(student.get("init"), "student.init", student.get("architecture"))
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        self.check_stages(stages)
        self.check_parallel(raw.get("parallel"), student_shape)
        self.check_task(raw.get("task"))

    def check_teachers(self, teachers: list[Any]) -> None:
        seen: set[str] = set()
        for i, t in enumerate(teachers):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                continue
            if t["name"] in seen:
                self.add(f"teachers[{i}].name", f"duplicate teacher name '{t['name']}'")
            seen.add(t["name"])
            shape = self.checkpoint_shape(t.get("path"), f"teachers[{i}].path")
            if shape is not None:
                self.teacher_shapes[t["name"]] = shape

    def check_data(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            return
        for split in ("train", "eval", "test"):
            ds = data.get(split)
            if isinstance(ds, dict):
                self.path(ds.get("path"), f"{where}.{split}.path", kind="data file")

    def check_student_init(self, init: Any, where: str, arch: Any, published: set[str] | None = None) -> dict[str, Any] | None:
        """Check a student_init block; returns the student's expected shape when known.

        ``published``: teachers published by earlier stages (their shape is not known yet)."""
        if not isinstance(init, dict):
            return None
        strategy = init.get("strategy")
        shape: dict[str, Any] | None = None
        if strategy in ("pretrained", "run"):
            if "path" not in init:
                self.add(where, f"strategy '{strategy}' needs 'path'")
            elif strategy == "pretrained":
                shape = self.checkpoint_shape(init["path"], f"{where}.path")
            else:
                run_dir = self.path(init["path"], f"{where}.path", kind="run directory")
                if run_dir is not None and not (run_dir / "export" / "config.json").is_file():
                    self.add(f"{where}.path", f"{run_dir} holds no exported student (export/config.json); run it to the end first")
        elif strategy in ("truncate", "random"):
            name = init.get("teacher")
            if name is None and strategy == "truncate":
                self.add(where, "strategy 'truncate' needs 'teacher' (the teacher to copy layers from)")
            elif name is None and "path" not in init:
                self.add(where, "strategy 'random' needs 'teacher' or 'path' to take the model shape from")
            elif name is not None:
                shape = self.teacher_ref(name, f"{where}.teacher", published)
                if shape is not None:
                    shape = dict(shape)
            else:
                shape = self.checkpoint_shape(init["path"], f"{where}.path")
            if shape is not None:
                layers = init.get("layers", "uniform")
                depth = init.get("num_layers") or (arch or {}).get("num_layers")
                total = shape["num_layers"]
                if isinstance(layers, list):
                    bad = [x for x in layers if isinstance(x, int) and not 0 <= x < total]
                    if bad:
                        self.add(f"{where}.layers", f"layer indices {bad} are out of range for a {total}-layer teacher (0..{total - 1})")
                    if depth is not None and depth != len(layers):
                        self.add(f"{where}.num_layers", f"{depth} does not match the {len(layers)} layers listed in layers")
                    depth = len(layers)
                elif strategy == "truncate" and depth is None:
                    self.add(where, "strategy 'truncate' with layers 'bottom'/'uniform' needs num_layers (or student.architecture.num_layers)")
                elif isinstance(depth, int) and isinstance(total, int) and depth > total and strategy == "truncate":
                    self.add(f"{where}.num_layers", f"{depth} layers cannot be truncated from a {total}-layer teacher")
                if depth is not None:
                    shape["num_layers"] = depth
        if shape is not None and isinstance(arch, dict):
            shape.update({k: v for k, v in arch.items() if isinstance(v, int)})
            if "num_heads" in arch and "num_kv_heads" not in arch:
                shape["num_kv_heads"] = arch["num_heads"]
        return shape

    def teacher_ref(self, name: Any, where: str, available: set[str] | None = None) -> dict[str, Any] | None:
        known = set(self.defined_teachers()) | (available or set())
        if not isinstance(name, str):
            return None
        if name not in known:
            hint = closest(name, sorted(known))
            self.add(where, f"unknown teacher '{name}'" + (f"; did you mean '{hint}'?" if hint else f" (teachers: {', '.join(sorted(known)) or 'none'})"))
            return None
        return self.teacher_shapes.get(name)

    def defined_teachers(self) -> list[str]:
        ts = self.raw.get("teachers")
        return [t["name"] for t in ts if isinstance(t, dict) and isinstance(t.get("name"), str)] if isinstance(ts, list) else []

    def check_stages(self, stages: list[Any]) -> None:
        published: set[str] = set()
        names: set[str] = set()
        for i, stage in enumerate(stages):
            where = f"stages[{i}]"
            if not isinstance(stage, dict):
                continue
            name = stage.get("name")
            if isinstance(name, str):
                if name in names:
                    self.add(f"{where}.name", f"duplicate stage name '{name}'")
                names.add(name)
            if ("steps" in stage) == ("epochs" in stage):
                self.add(where, "give exactly one of 'steps' or 'epochs'")
            available = set(self.defined_teachers()) | published
            stage_teachers = stage.get("teachers")
            if isinstance(stage_teachers, list):
                for k, t in enumerate(stage_teachers):
                    self.teacher_ref(t, f"{where}.teachers[{k}]", published)
                used = [t for t in stage_teachers if isinstance(t, str)]
            else:
                used = sorted(available)
            train = stage.get("train", "student")
            methods = stage.get("methods") if isinstance(stage.get("methods"), list) else []
            if isinstance(train, str) and train != "student":
                if not train.startswith("teacher:"):
                    self.add(f"{where}.train", f"'{train}' must be 'student' or 'teacher:NAME'")
                else:
                    self.teacher_ref(train.split(":", 1)[1], f"{where}.train")
                    if methods:
                        self.add(f"{where}.methods", "a stage that fine-tunes a teacher is plain training: remove its methods")
            self.check_methods(methods, where, stage.get("kind", "task"), used)
            if isinstance(stage.get("data"), dict):
                self.check_data(stage["data"], f"{where}.data")
            if isinstance(stage.get("student_init"), dict):
                self.check_student_init(stage["student_init"], f"{where}.student_init", None, published)
            pub = stage.get("publish_as_teacher")
            if isinstance(pub, str):
                if pub in available:
                    self.add(f"{where}.publish_as_teacher", f"a teacher named '{pub}' already exists")
                published.add(pub)

    def check_methods(self, methods: list[Any], where: str, stage_kind: Any, stage_teachers: list[str]) -> None:
        for k, entry in enumerate(methods):
            mwhere = f"{where}.methods[{k}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or self.registry is None:
                continue
            try:
                spec = self.registry.get(entry["name"]).spec
            except GkdError as exc:
                self.add(f"{mwhere}.name", str(exc))
                continue
            config = entry.get("config", {})
            if isinstance(config, dict):
                self.issues.extend(schema_issues(spec.config_schema, config, prefix=f"{mwhere}.config"))
            if isinstance(stage_kind, str) and stage_kind not in spec.stages:
                self.add(f"{mwhere}.name", f"method '{spec.name}' applies to {'/'.join(spec.stages)} stages, not to a '{stage_kind}' stage")
            teachers = entry.get("teachers", stage_teachers)
            if isinstance(teachers, list):
                for t_i, t in enumerate(entry.get("teachers", [])):
                    if isinstance(t, str) and t not in stage_teachers:
                        self.add(f"{mwhere}.teachers[{t_i}]", f"teacher '{t}' is not used by this stage (stage teachers: {', '.join(stage_teachers) or 'none'})")
                n = len(teachers)
                if spec.kind == "multi-teacher" and n < 2:
                    self.add(f"{mwhere}.name", f"multi-teacher method '{spec.name}' needs at least 2 teachers, this stage gives it {n}")
                elif spec.kind == "single-teacher" and n > 1:
                    self.add(f"{mwhere}.teachers", f"single-teacher method '{spec.name}' reads one teacher, this stage gives it {n}"
                             f" ({', '.join(map(str, teachers))}); list the one to use in methods[{k}].teachers")
                elif n == 0:
                    self.add(f"{mwhere}.name", f"method '{spec.name}' needs a teacher, this stage has none")

    def check_parallel(self, parallel: Any, student_shape: dict[str, Any] | None) -> None:
        parallel = parallel if isinstance(parallel, dict) else {}
        tp = parallel.get("tensor_parallel", 1)
        zero = parallel.get("zero") if isinstance(parallel.get("zero"), dict) else {}
        if zero.get("offload_param") and zero.get("stage", 0) != 3:
            self.add("parallel.zero.offload_param", f"parameter offload needs ZeRO stage 3 (stage is {zero.get('stage', 0)})")
        if not isinstance(tp, int) or tp <= 1:
            return
        models = [(f"teacher '{n}'", s) for n, s in self.teacher_shapes.items()]
        if student_shape is not None:
            models.append(("the student", student_shape))
        for who, shape in models:
            for key, label in (("num_heads", "attention heads"), ("num_kv_heads", "key/value heads"), ("ffn_hidden_size", "FFN width")):
                value = shape.get(key)
                if key == "num_kv_heads" and value == shape.get("num_heads"):
                    continue  # no grouped-query attention: already reported with the heads
                if isinstance(value, int) and value % tp:
                    self.add("parallel.tensor_parallel", f"{tp} must divide the {label} of {who} ({value})")

    def check_task(self, task: Any) -> None:
        if not isinstance(task, dict):
            return
        wants = {"causal_lm": DECODER_TYPES, "masked_lm": ENCODER_TYPES}.get(task.get("type", ""))
        if wants is None:
            return
        for name, shape in self.teacher_shapes.items():
            if shape["model_type"] not in wants:
                self.add("task.type", f"'{task['type']}' needs {'a decoder' if wants is DECODER_TYPES else 'an encoder'}; teacher '{name}' is a '{shape['model_type']}' model")


# ---------------------------------------------------------------------------- building


def _dataset(raw: dict[str, Any] | None, base: Path) -> DatasetConfig | None:
    if raw is None:
        return None
    return DatasetConfig(resolve_path(raw["path"], base), raw["format"], raw["text_field"], raw["label_field"], raw.get("limit"))


def _init(raw: dict[str, Any], base: Path) -> StudentInit:
    layers = raw.get("layers", "uniform")
    return StudentInit(
        strategy=raw["strategy"],
        path=resolve_path(raw["path"], base) if "path" in raw else None,
        teacher=raw.get("teacher"),
        layers=tuple(layers) if isinstance(layers, list) else layers,
        num_layers=raw.get("num_layers"),
    )


def _build(raw: dict[str, Any], user: dict[str, Any], base: Path, registry: MethodRegistry | None,
           source: Path | None) -> RunConfig:
    """``raw`` is the defaulted config; ``user`` the config as written (stage overrides come
    from it, so a stage's partial ``training`` block does not reset the top-level values)."""
    available = [t["name"] for t in raw["teachers"]]
    stages = []
    for s, user_stage in zip(raw["stages"], user["stages"], strict=True):
        stage_teachers = tuple(s.get("teachers", available))
        methods = []
        for m in s["methods"]:
            schema = registry.get(m["name"]).spec.config_schema if registry is not None else {}
            methods.append(MethodEntry(m["name"], float(m["weight"]), tuple(m.get("teachers", stage_teachers)),
                                       apply_defaults(schema, m["config"])))
        data = s.get("data", {})
        stages.append(StageConfig(
            name=s["name"], kind=s["kind"], train=s["train"], teachers=stage_teachers, methods=tuple(methods),
            steps=s.get("steps"), epochs=s.get("epochs"),
            train_data=_dataset(data.get("train"), base) or _dataset(raw["data"]["train"], base),  # type: ignore[arg-type]
            eval_data=_dataset(data.get("eval"), base) or _dataset(raw["data"].get("eval"), base),
            optimizer={**raw["optimizer"], **user_stage.get("optimizer", {})},
            schedule={**raw["schedule"], **user_stage.get("schedule", {})},
            training={**raw["training"], **user_stage.get("training", {})},
            publish_as_teacher=s.get("publish_as_teacher"),
            student_init=_init(s["student_init"], base) if "student_init" in s else None,
        ))
        if "publish_as_teacher" in s:  # later stages see the published teacher by default, as validation does
            available.append(s["publish_as_teacher"])
    zero = raw["parallel"]["zero"]
    return RunConfig(
        name=raw["name"],
        run_dir=Path(raw["run_dir"]).expanduser(),
        seed=raw["seed"],
        task=raw["task"],
        teachers=tuple(TeacherConfig(t["name"], resolve_path(t["path"], base), t["dtype"]) for t in raw["teachers"]),
        student_init=_init(raw["student"]["init"], base),
        student_architecture=dict(raw["student"].get("architecture", {})),
        stages=tuple(stages),
        parallel=ParallelConfig(raw["parallel"]["tensor_parallel"], ZeroConfig(zero["stage"], zero["offload_optimizer"], zero["offload_param"])),
        checkpoint=raw["checkpoint"],
        logging=raw["logging"],
        export=raw["export"],
        train_data=_dataset(raw["data"]["train"], base),  # type: ignore[arg-type]
        test_data=_dataset(raw["data"].get("test"), base),
        source=source,
        raw=raw,
    )


def check_config(raw: dict[str, Any], base_dir: Path, registry: MethodRegistry | None) -> list[ConfigIssue]:
    """Every problem of ``raw`` (schema, method schemas, cross-field rules), in one list."""
    raw = apply_defaults(run_schema(), raw) if isinstance(raw, dict) else raw
    checker = _Checker(raw, base_dir, registry)
    checker.run()
    return sorted(checker.issues, key=lambda i: _natural(i.path))


def _natural(path: str) -> list[tuple[int, Any]]:
    """Sort key putting ``stages[2]`` before ``stages[10]``."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", path)]


def build_run_config(raw: dict[str, Any], *, base_dir: Path, registry: MethodRegistry | None = None,
                     source: Path | None = None) -> RunConfig:
    """Validate ``raw`` and return the typed config, or raise :class:`ConfigError` with all issues."""
    issues = check_config(raw, base_dir, registry)
    if issues:
        raise ConfigError(issues, str(source) if source else None)
    return _build(apply_defaults(run_schema(), copy.deepcopy(raw)), raw, base_dir, registry, source)


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                    registry: MethodRegistry | None = None) -> RunConfig:
    """Read, override (``--set``), validate and type a run config file.

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
