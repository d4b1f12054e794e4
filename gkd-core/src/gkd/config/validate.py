"""Config validation in three layers, all errors reported at once:

1. the run schema (types, ranges, unknown keys with "did you mean");
2. each selected method's own schema, under ``stages[i].methods[j].config``;
3. rules that span fields — references between teachers, stages and methods; paths that
   must exist; tensor-parallel divisibility of every model's heads; and whether each
   method's declared features fit the teacher and student shapes — all read from the
   checkpoints' ``config.json``, before any model is built.

Decisions shared with the typed build (default teachers, merged sections) come from
:mod:`gkd.config.resolve`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd.config import resolve
from gkd.config.errors import ConfigIssue
from gkd.config.paths import PathResolutionError, resolve_path
from gkd.config.schema import apply_defaults, closest, run_schema, schema_issues
from gkd.config.values import ConfigTooLarge, sanitize
from gkd.config.vocabulary import read_vocabulary, vocabulary_problems
from gkd.errors import GkdError
from gkd.plugins.registry import MethodRegistry

if TYPE_CHECKING:  # the method API imports torch; checking a config needs it only with methods
    from gkd.methods.api import ModelShape


def shape_from_hf(cfg: dict[str, Any]) -> ModelShape | None:
    """A checkpoint's shape from its ``config.json`` (None: not a model gkd reads), with the
    checkpoint's own head (from ``architectures``)."""
    family = resolve.family_of(str(cfg.get("model_type", "?")))
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    if family is None or not all(isinstance(cfg.get(k), int) for k in keys):
        return None
    from gkd.methods.api import ModelShape

    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    attention = _attention_size(cfg, hidden)
    return ModelShape(family, cfg["num_hidden_layers"], hidden, heads,
                      int(cfg.get("num_key_value_heads") or heads), cfg["intermediate_size"],
                      int(cfg.get("vocab_size") or 0), head=_own_head(cfg),
                      attention_size=None if attention == hidden else attention)


def _attention_size(cfg: dict[str, Any], hidden: int) -> int:
    """Width of the attention (heads × head_dim): MobileBERT's ``intra_bottleneck_size`` (transformers'
    defaults: ``use_bottleneck`` true, 128), else ``hidden``."""
    if cfg.get("model_type") == "mobilebert":
        intra = cfg.get("intra_bottleneck_size", 128)
        return intra if cfg.get("use_bottleneck", True) and isinstance(intra, int) else hidden
    return hidden


def with_overrides(shape: ModelShape, arch: Any) -> ModelShape:
    """``student.architecture`` applied to a shape (its keys are ModelShape's field names)."""
    if not isinstance(arch, dict):
        return shape
    fields = {f.name for f in dataclasses.fields(shape)}  # unknown keys are reported by the schema
    given = {k: v for k, v in arch.items() if k in fields and isinstance(v, int) and not isinstance(v, bool)}
    if "num_attention_heads" in given and "num_kv_heads" not in given:
        given["num_kv_heads"] = given["num_attention_heads"]
    return replace(shape, **given)


def as_seen_by_methods(shape: ModelShape, task_head: str | None, num_labels: int | None, *,
                       student: bool) -> ModelShape:
    """The shape a method will see: the student always has the task's head; a teacher has it
    when its checkpoint does, else its own (as the engine builds them)."""
    head = task_head if student or shape.head == task_head else shape.head
    return replace(shape, head=head, num_labels=num_labels if head == "classification" else None,
                   has_pooler=None if head is None else shape.family == "encoder" and head != "mlm")


def _own_head(cfg: dict[str, Any]) -> str | None:
    from gkd.models.config import ModelConfig

    try:
        return ModelConfig.from_hf_config(cfg).head
    except (ValueError, TypeError, KeyError):
        return None


class _Checker:
    def __init__(self, raw: dict[str, Any], base_dir: Path, registry: MethodRegistry | None) -> None:
        self.raw = raw
        self.base_dir = base_dir
        self.registry = registry
        self.issues: list[ConfigIssue] = []
        self.shapes: dict[str, ModelShape] = {}
        """Teacher name -> shape (defined teachers, then published ones as stages go)."""

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

    def checkpoint_shape(self, value: Any, where: str, *, weights: bool = True) -> ModelShape | None:
        """The shape of the checkpoint at ``value``; ``weights``: it must also hold safetensors weights."""
        p = self.path(value, where, kind="checkpoint directory")
        if p is None:
            return None
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            self.add(where, f"{p} has no config.json (expected a Hugging Face checkpoint directory)")
            return None
        if weights and not any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            self.add(where, f"{p} has no model.safetensors or model.safetensors.index.json (gkd reads safetensors "
                            "weights only; convert a pytorch_model.bin checkpoint first)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            self.add(where, f"cannot read {cfg_path}: {exc}")
            return None
        shape = shape_from_hf(cfg) if isinstance(cfg, dict) else None
        if shape is None:
            model_type = cfg.get("model_type", "?") if isinstance(cfg, dict) else "?"
            supported = ", ".join(sorted(resolve.ENCODER_TYPES | resolve.DECODER_TYPES))
            self.add(where, f"model_type '{model_type}' in {cfg_path} is not supported (gkd reads {supported})"
                     if resolve.family_of(str(model_type)) is None else f"{cfg_path} lacks layer/width/head counts")
        return shape

    def teacher_ref(self, name: Any, where: str, available: tuple[str, ...] | list[str]) -> bool:
        if not isinstance(name, str):
            return False
        if name not in available:
            hint = closest(name, sorted(available))
            self.add(where, f"unknown teacher '{name}'" + (f"; did you mean '{hint}'?" if hint
                                                            else f" (teachers: {', '.join(sorted(available)) or 'none'})"))
            return False
        return True

    # ------------------------------------------------------------------ sections

    def run(self) -> None:
        raw = self.raw
        self.issues.extend(schema_issues(run_schema(), raw))
        self.check_teachers(raw.get("teachers") if isinstance(raw.get("teachers"), list) else [])
        self.check_data(raw.get("data"), "data")
        student = raw.get("student") if isinstance(raw.get("student"), dict) else {}
        arch = student.get("architecture")
        shape = self.check_student_init(student.get("init"), "student.init", arch, tuple(resolve.defined_teachers(raw)))
        student_shapes = self.check_stages(shape, arch)
        self.check_parallel(raw.get("parallel"), student_shapes)
        self.check_task(raw.get("task"))
        self.check_labels()
        self.check_vocabularies()
        self.check_offload()
        self.check_export(raw.get("export"))
        self.check_logging(raw.get("logging"))

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
                self.shapes[t["name"]] = shape

    def check_data(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            return
        for split in ("train", "eval", "test"):
            ds = data.get(split)
            if isinstance(ds, dict):
                self.path(ds.get("path"), f"{where}.{split}.path", kind="data file")

    def check_student_init(self, init: Any, where: str, arch: Any, available: tuple[str, ...]) -> ModelShape | None:
        """Check a student_init block; returns the student's shape when it can be known."""
        if not isinstance(init, dict):
            return None
        strategy = init.get("strategy")
        shape: ModelShape | None = None
        if strategy in ("pretrained", "run"):
            if "path" not in init:
                self.add(where, f"strategy '{strategy}' needs 'path'")
            elif strategy == "pretrained":
                shape = self.checkpoint_shape(init["path"], f"{where}.path")
            else:
                run_dir = self.path(init["path"], f"{where}.path", kind="run directory")
                if run_dir is not None:
                    if not (run_dir / "export" / "config.json").is_file():
                        self.add(f"{where}.path", f"{run_dir} holds no exported student (export/config.json); run it to the end first")
                    else:
                        shape = self.checkpoint_shape(str(run_dir / "export"), f"{where}.path")
        elif strategy in ("truncate", "random"):
            name = init.get("teacher")
            if name is None and strategy == "truncate":
                self.add(where, "strategy 'truncate' needs 'teacher' (the teacher to copy layers from)")
            elif name is None and "path" not in init:
                self.add(where, "strategy 'random' needs 'teacher' or 'path' to take the model shape from")
            elif name is not None:
                if self.teacher_ref(name, f"{where}.teacher", available):
                    shape = self.shapes.get(name)
            else:  # random from a checkpoint's shape: its weights are not read
                shape = self.checkpoint_shape(init["path"], f"{where}.path", weights=False)
            if shape is not None:
                shape = self._depth(init, where, strategy, shape, arch)
        return with_overrides(shape, arch) if shape is not None else None

    def _depth(self, init: dict[str, Any], where: str, strategy: str, shape: ModelShape, arch: Any) -> ModelShape:
        layers = init.get("layers", "strided")
        depth = init.get("num_layers") or (arch.get("num_layers") if isinstance(arch, dict) else None)
        total = shape.num_layers
        if isinstance(layers, list):
            bad = [x for x in layers if isinstance(x, int) and not 0 <= x < total]
            if bad:
                self.add(f"{where}.layers", f"layer indices {bad} are out of range for a {total}-layer teacher (0..{total - 1})")
            if depth is not None and depth != len(layers):
                self.add(f"{where}.num_layers", f"{depth} does not match the {len(layers)} layers listed in layers")
            depth = len(layers)
        elif strategy == "truncate" and depth is None:
            self.add(where, "strategy 'truncate' with layers 'bottom'/'strided' needs num_layers (or student.architecture.num_layers)")
        elif isinstance(depth, int) and depth > total and strategy == "truncate":
            self.add(f"{where}.num_layers", f"{depth} layers cannot be truncated from a {total}-layer teacher")
        return replace(shape, num_layers=depth) if isinstance(depth, int) else shape

    def check_stages(self, student: ModelShape | None, arch: Any) -> list[ModelShape]:
        """Check every stage; returns every student shape the run goes through."""
        seen_shapes = [student] if student is not None else []
        names: set[str] = set()
        for view in resolve.stages(self.raw):
            stage, where = view.raw, f"stages[{view.index}]"
            name = stage.get("name")
            if isinstance(name, str):
                if name in names:
                    self.add(f"{where}.name", f"duplicate stage name '{name}'")
                names.add(name)
            if ("steps" in stage) == ("epochs" in stage):
                self.add(where, "give exactly one of 'steps' or 'epochs'")
            if isinstance(stage.get("teachers"), list):
                for k, t in enumerate(stage["teachers"]):
                    self.teacher_ref(t, f"{where}.teachers[{k}]", view.available)
            if isinstance(stage.get("student_init"), dict):
                student = self.check_student_init(stage["student_init"], f"{where}.student_init", arch, view.available)
                if student is not None:
                    seen_shapes.append(student)
            methods = stage.get("methods") if isinstance(stage.get("methods"), list) else []
            train = stage.get("train", "student")
            if isinstance(train, str) and train != "student":
                if not train.startswith("teacher:"):
                    self.add(f"{where}.train", f"'{train}' must be 'student' or 'teacher:NAME'")
                else:
                    tuned = train.split(":", 1)[1]
                    if self.teacher_ref(tuned, f"{where}.train", view.available) and tuned in self.shapes:
                        # later stages see the fine-tuned teacher, which has the task's head
                        self.shapes[tuned] = replace(self.shapes[tuned], head=self._task_head())
                    if methods:
                        self.add(f"{where}.methods", "a stage that fine-tunes a teacher is plain training: remove its methods")
            self.check_methods(methods, where, stage.get("kind", "task"), view.teachers, student,
                               stage_lists=isinstance(stage.get("teachers"), list))
            if isinstance(stage.get("data"), dict):
                self.check_data(stage["data"], f"{where}.data")
            self.check_early_stopping(stage, where)
            pub = stage.get("publish_as_teacher")
            if isinstance(pub, str):
                if pub in view.available:
                    self.add(f"{where}.publish_as_teacher", f"a teacher named '{pub}' already exists")
                elif student is not None:  # the student of this stage, with the task's head it was trained with
                    self.shapes[pub] = replace(student, head=self._task_head())
        return seen_shapes

    def check_early_stopping(self, stage: dict[str, Any], where: str) -> None:
        """``training.early_stopping`` judges periodic evaluations: it needs an eval split and
        ``eval_every_steps``."""
        training = resolve.merged_section(self.raw, stage, "training")
        if not isinstance(training.get("early_stopping"), dict):
            return
        own = stage.get("training") if isinstance(stage.get("training"), dict) else {}
        field = f"{where}.training.early_stopping" if "early_stopping" in own else "training.early_stopping"
        data = stage.get("data") if isinstance(stage.get("data"), dict) else {}
        top = self.raw.get("data") if isinstance(self.raw.get("data"), dict) else {}
        if "eval" not in data and "eval" not in top:
            self.add(field, f"stage '{stage.get('name')}' has no eval split to judge (set data.eval or "
                            f"{where}.data.eval)")
        if not training.get("eval_every_steps"):
            self.add(field, f"stage '{stage.get('name')}' evaluates only at its end; set training.eval_every_steps")

    def _task_head(self) -> str | None:
        task = self.raw.get("task")
        return resolve.HEAD_FOR_TASK.get(str(task.get("type"))) if isinstance(task, dict) else None

    def check_methods(self, methods: list[Any], where: str, stage_kind: Any, stage_teachers: list[str],
                      student: ModelShape | None, *, stage_lists: bool = True) -> None:
        claims: dict[str, tuple[str, str, int]] = {}
        """resource -> (method, field, index) of the first method of the stage that claims it."""
        for k, entry in enumerate(methods):
            mwhere = f"{where}.methods[{k}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or self.registry is None:
                continue
            if any(isinstance(e, dict) and e.get("name") == entry["name"] for e in methods[:k]):
                self.add(f"{mwhere}.name", f"method '{entry['name']}' is selected twice in this stage; "
                                           "combine its settings in one entry")
                continue
            try:
                spec = self.registry.get(entry["name"]).spec
            except GkdError as exc:
                self.add(f"{mwhere}.name", str(exc))
                continue
            config = entry.get("config", {})
            config_ok = isinstance(config, dict) and not (issues := schema_issues(spec.config_schema, config, prefix=f"{mwhere}.config"))
            if isinstance(config, dict) and not config_ok:
                self.issues.extend(issues)
            if isinstance(stage_kind, str) and stage_kind not in spec.stages:
                self.add(f"{mwhere}.name", f"method '{spec.name}' applies to {'/'.join(spec.stages)} stages, not to a '{stage_kind}' stage")
            for t_i, t in enumerate(entry.get("teachers", []) if isinstance(entry.get("teachers"), list) else []):
                if isinstance(t, str) and t not in stage_teachers:
                    self.add(f"{mwhere}.teachers[{t_i}]", f"teacher '{t}' is not used by this stage (stage teachers: {', '.join(stage_teachers) or 'none'})")
            teachers = resolve.method_teachers(entry, stage_teachers, spec.kind, stage_lists=stage_lists)
            n = len(teachers)
            if spec.kind == "multi-teacher" and n < 2:
                self.add(f"{mwhere}.name", f"multi-teacher method '{spec.name}' needs at least 2 teachers, this stage gives it {n}")
            elif spec.kind == "single-teacher" and n > 1:
                self.add(f"{mwhere}.teachers", f"single-teacher method '{spec.name}' reads one teacher, this stage gives it {n}"
                         f" ({', '.join(teachers)}); list the one to use in methods[{k}].teachers")
            elif spec.kind == "teacher-assistant" and n > 1:
                self.add(f"{mwhere}.teachers", f"teacher-assistant method '{spec.name}' distils from one teacher, "
                         f"the previous link of the chain; this stage gives it {n} ({', '.join(teachers)}): list "
                         f"that one in methods[{k}].teachers, or leave the stage's teachers out (it then reads "
                         "the teacher published last)")
            elif n == 0:
                self.add(f"{mwhere}.name", f"method '{spec.name}' needs a teacher, this stage has none")
            elif config_ok and student is not None and all(t in self.shapes for t in teachers):
                self.check_features(spec, apply_defaults(spec.config_schema, config), mwhere, stage_kind, student, teachers)
            if config_ok:
                self.check_exclusive(spec, apply_defaults(spec.config_schema, config), where, k, claims)

    def check_exclusive(self, spec: Any, config: dict[str, Any], where: str, k: int,
                        claims: dict[str, tuple[str, str, int]]) -> None:
        """Two methods of one stage may not both claim a resource (``Method.exclusive``)."""
        exclusive = getattr(spec.factory, "exclusive", None)
        for resource, field in (exclusive(config) if callable(exclusive) else {}).items():
            if resource in claims:
                other, other_field, j = claims[resource]
                what = "the hard (gold-label) loss" if resource == "hard_loss" else f"'{resource}'"
                self.add(f"{where}.methods[{k}].config.{field}",
                         f"methods '{other}' (methods[{j}].config.{other_field}) and '{spec.name}' both claim {what}; "
                         f"only one method of a stage may" + (f" (set {field}: 0 on one of them)"
                                                              if resource == "hard_loss" else ""))
            else:
                claims[resource] = (spec.name, field, k)

    def check_features(self, spec: Any, config: dict[str, Any], where: str, stage_kind: Any, student: ModelShape,
                       teachers: list[str]) -> None:
        """The method's declared features and shape rules against the models' shapes."""
        from gkd.methods import MethodContext
        from gkd.methods.checks import check_features

        task = self.raw.get("task") if isinstance(self.raw.get("task"), dict) else {}
        head, labels = self._task_head(), task.get("num_labels")
        parallel = self.raw.get("parallel") if isinstance(self.raw.get("parallel"), dict) else {}
        context = MethodContext(student=as_seen_by_methods(student, head, labels, student=True),
                                teachers={t: as_seen_by_methods(self.shapes[t], head, labels, student=False) for t in teachers},
                                task=str(task.get("type", "")), stage_kind=str(stage_kind),
                                tensor_parallel=tp if isinstance(tp := parallel.get("tensor_parallel"), int) else 1)
        for issue in check_features(spec, config, context):
            field = f"{where}.config.{issue.field}" if issue.field else f"{where}.name"
            self.add(field, issue.message)

    def check_parallel(self, parallel: Any, student_shapes: list[ModelShape]) -> None:
        parallel = parallel if isinstance(parallel, dict) else {}
        tp = parallel.get("tensor_parallel", 1)
        zero = parallel.get("zero") if isinstance(parallel.get("zero"), dict) else {}
        if zero.get("offload_param") and zero.get("stage", 0) != 3:
            self.add("parallel.zero.offload_param", f"parameter offload needs ZeRO stage 3 (stage is {zero.get('stage', 0)})")
        if not isinstance(tp, int) or tp <= 1:
            return
        defined = set(resolve.defined_teachers(self.raw))
        models = [(f"teacher '{n}'", s) for n, s in self.shapes.items() if n in defined]
        models += [("the student", s) for s in dict.fromkeys(student_shapes)]
        for who, shape in models:
            for key, label in (("num_attention_heads", "attention heads"), ("num_kv_heads", "key/value heads"), ("ffn_hidden_size", "FFN width")):
                value = getattr(shape, key)
                if key == "num_kv_heads" and value == shape.num_attention_heads:
                    continue  # no grouped-query attention: already reported with the heads
                if value % tp:
                    self.add("parallel.tensor_parallel", f"{tp} must divide the {label} of {who} ({value})")

    def check_task(self, task: Any) -> None:
        if not isinstance(task, dict):
            return
        wants = {"causal_lm": "decoder", "masked_lm": "encoder"}.get(str(task.get("type", "")))
        if wants is None:
            return
        for name in resolve.defined_teachers(self.raw):
            shape = self.shapes.get(name)
            if shape is not None and shape.family != wants:
                self.add("task.type", f"'{task['type']}' needs {'a decoder' if wants == 'decoder' else 'an encoder'}; "
                                      f"teacher '{name}' is {'a decoder' if wants == 'encoder' else 'an encoder'}")

    def check_labels(self) -> None:
        """A classification run's splits and label count (:func:`gkd.engine.datacheck.data_issues`)."""
        from gkd.engine.datacheck import data_issues

        self.issues.extend(data_issues(self.raw, self.base_dir, self.issues))

    def check_export(self, export: Any) -> None:
        """``export.onnx`` needs the export itself and the optional extra (checked without importing it)."""
        if not isinstance(export, dict) or export.get("onnx", "none") == "none":
            return
        from gkd.deploy.extras import install_hint, missing

        if export.get("enabled") is False:
            self.add("export.onnx", f"'{export['onnx']}' needs export.enabled: true (the ONNX model is made from the export)")
        absent = missing()
        if absent:
            self.add("export.onnx", install_hint(f"'{export['onnx']}'", absent))

    def check_logging(self, logging: Any) -> None:
        """``logging.tensorboard`` / ``logging.wandb`` need their optional extras (checked without
        importing them)."""
        if not isinstance(logging, dict):
            return
        from gkd.engine.sinks import TENSORBOARD_HINT, WANDB_HINT, tensorboard_missing, wandb_missing

        if logging.get("tensorboard") is True and tensorboard_missing():
            self.add("logging.tensorboard", TENSORBOARD_HINT)
        if logging.get("wandb") not in (None, False) and wandb_missing():
            self.add("logging.wandb", WANDB_HINT)

    # ------------------------------------------------------------------ one vocabulary

    def _checkpoint_dir(self, value: Any, sub: str | None = None) -> Path | None:
        """An existing checkpoint directory, or None (a missing one is reported elsewhere)."""
        if not isinstance(value, str):
            return None
        try:
            p = resolve_path(value, self.base_dir)
        except PathResolutionError:
            return None
        p = p / sub if sub else p
        return p if (p / "config.json").is_file() else None

    def check_vocabularies(self) -> None:
        """gkd feeds every model of a step the same token ids (from the run's tokenizer), so every
        teacher and every checkpoint a student starts from must have the run's vocabulary: the
        same ``vocab_size`` in ``config.json`` and, when both have tokenizer files, the same token
        for every id. A checkpoint without tokenizer files is judged by its ``vocab_size`` alone."""
        teachers = {t["name"]: (i, self._checkpoint_dir(t.get("path")))
                    for i, t in enumerate(self.raw.get("teachers") if isinstance(self.raw.get("teachers"), list) else [])
                    if isinstance(t, dict) and isinstance(t.get("name"), str)}
        student = self.raw.get("student") if isinstance(self.raw.get("student"), dict) else {}
        top_init = student.get("init") if isinstance(student.get("init"), dict) else {}
        models = [(f"teachers[{i}].path", f"teacher '{name}'", p) for name, (i, p) in teachers.items() if p is not None]
        inits = [("student.init", top_init)] + [(f"stages[{v.index}].student_init", v.raw.get("student_init"))
                                                for v in resolve.stages(self.raw)]
        for where, init in inits:
            if isinstance(init, dict) and init.get("teacher") is None and "path" in init:
                p = self._checkpoint_dir(init["path"], "export" if init.get("strategy") == "run" else None)
                if p is not None:
                    models.append((f"{where}.path", f"the student's checkpoint ({where}.path)", p))
        # The run's tokenizer, as the engine picks it (RunAssets.tokenizer_dir).
        first = next(iter(teachers), None)
        given = top_init.get("teacher")
        named = given if isinstance(given, str) and given in teachers else None
        if named is None and top_init.get("teacher") is None and first is not None:
            named = first
        if named is not None:
            ref_label, ref_path = f"teacher '{named}'", teachers[named][1]
        else:
            ref_label, ref_path = "the student's checkpoint (student.init.path)", next(
                (p for w, _, p in models if w == "student.init.path"), None)
        if ref_path is None:
            return
        ref = read_vocabulary(ref_path)
        if ref.tokens and ref.size is not None and max(ref.tokens) >= ref.size:
            # Token ids past the embedding table would fail at the first forward pass.
            ref_where = f"teachers[{teachers[named][0]}].path" if named is not None else "student.init.path"
            self.add(ref_where, f"the run's tokenizer ({ref_label}: {ref.source}) has token ids up to "
                                f"{max(ref.tokens)}, but its config.json has vocab_size {ref.size}; resize the "
                                "embeddings to the tokenizer or use its own tokenizer files")
        for where, who, path in models:
            if path != ref_path:
                for problem in vocabulary_problems(who, read_vocabulary(path), ref_label, ref):
                    self.add(where, problem)

    # ------------------------------------------------------------------ offloaded and partitioned teachers

    def check_offload(self) -> None:
        """An offloaded teacher (``teachers[].offload``) or one partitioned over the data-parallel
        ranks (``teachers[].partition``) has its weights only during its own forward pass. A method
        that takes the models in ``Method.setup`` may run a teacher's modules elsewhere (Theseus
        runs teacher layers inside the student's forward), so its teachers must stay whole on the
        device. A partition keeps 1/DP of the weights in memory, ``disk`` keeps none: not both."""
        raw_teachers = self.raw.get("teachers") if isinstance(self.raw.get("teachers"), list) else []
        entries = [(i, t) for i, t in enumerate(raw_teachers) if isinstance(t, dict) and isinstance(t.get("name"), str)]
        for i, t in entries:
            if t.get("partition", "none") != "none" and t.get("offload", "none") == "disk":
                self.add(f"teachers[{i}].partition", f"'{t['partition']}' cannot be combined with offload 'disk' "
                         "(a partition keeps 1/DP of the teacher in memory, disk keeps none of it); use offload 'none' "
                         "or 'cpu' with the partition, or partition 'none'")
        # teacher -> [(field, mode)] of what takes its weights away between forward passes
        away = {t["name"]: (i, [(f, t.get(f, "none")) for f in ("offload", "partition") if t.get(f, "none") != "none"])
                for i, t in entries}
        if self.registry is None or not any(fields for _, fields in away.values()):
            return
        from gkd.config.run import strongest_offload
        from gkd.methods.api import Method

        offload = strongest_offload(str(t.get("offload", "none")) for _, t in entries)
        partitioned = offload != "disk" and any(t.get("partition", "none") != "none" for _, t in entries)
        published = [("offload", offload)] * (offload != "none") + [("partition", "data_parallel")] * partitioned
        seen: set[tuple[str, str]] = set()
        for view in resolve.stages(self.raw):
            methods = view.raw.get("methods") if isinstance(view.raw.get("methods"), list) else []
            for k, entry in enumerate(methods):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    continue
                try:
                    spec = self.registry.get(entry["name"]).spec
                except GkdError:
                    continue  # reported by check_methods
                if spec.factory is None or getattr(spec.factory, "setup", Method.setup) is Method.setup:
                    continue
                which = f"method '{spec.name}' (stages[{view.index}].methods[{k}])"
                why = ("takes the models in Method.setup and may run the teacher's modules outside the teacher's own "
                       "forward pass, where {} teacher holds no weights")
                listed = isinstance(view.raw.get("teachers"), list)
                for t in resolve.method_teachers(entry, view.teachers, spec.kind, stage_lists=listed):
                    issues = []
                    if t in away:
                        i, fields = away[t]
                        issues = [(f"teachers[{i}].{f}",
                                   f"teacher '{t}' cannot be {_PARTICIPLE[f]} ('{mode}') for {which}: "
                                   f"it {why.format(_ARTICLE[f])}; set {f}: none, or use another method")
                                  for f, mode in fields]
                    elif t in view.published_before:
                        issues = [(f"stages[{view.index}].methods[{k}].name",
                                   f"{which} {why.format(_ARTICLE[f])}, and teacher '{t}' (published by an earlier "
                                   f"stage) is {_PARTICIPLE[f]} ('{mode}', {_PUBLISHED[f]}); use another method, or "
                                   f"set every teachers[].{f} to none")
                                  for f, mode in published]
                    for issue in issues:
                        if issue not in seen:
                            seen.add(issue)
                            self.add(*issue)


_PARTICIPLE = {"offload": "offloaded", "partition": "partitioned"}
_ARTICLE = {"offload": "an offloaded", "partition": "a partitioned"}
_PUBLISHED = {"offload": "the strongest offload of teachers[]",
              "partition": "as some teacher of teachers[] is"}


def check_config(raw: dict[str, Any], base_dir: Path, registry: MethodRegistry | None) -> list[ConfigIssue]:
    """Every problem of ``raw`` (values, schema, method schemas, cross-field rules), in one list."""
    try:
        raw, value_issues = sanitize(raw)
    except ConfigTooLarge as exc:
        return [ConfigIssue("", str(exc))]
    raw = apply_defaults(run_schema(), raw) if isinstance(raw, dict) else raw
    checker = _Checker(raw, base_dir, registry)
    try:
        checker.run()
    except (TypeError, AttributeError, KeyError, IndexError, ValueError):
        # The cross-field checks read the types the schema asks for. On a config the schema has
        # already refused (its issues come first), one may trip over a wrong type: those issues
        # say what to fix. Without them it is a bug of gkd, shown as such.
        if not checker.issues:
            raise
    # A value already refused (NaN, 10**30...) was replaced by None: drop what the schema says of that None.
    refused = {i.path for i in value_issues}
    issues = value_issues + [i for i in checker.issues if i.path not in refused]
    return sorted(issues, key=lambda i: _natural(i.path))


def _natural(path: str) -> list[tuple[int, Any]]:
    """Sort key putting ``stages[2]`` before ``stages[10]``."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", path)]


__all__ = ["as_seen_by_methods", "check_config", "shape_from_hf", "with_overrides"]
