"""``gkd plan``: will a distillation fit, and how should it be laid out?

Two forms:

* ``gkd plan CONFIG --gpus 8 --gpu-memory 40GiB`` reads the teachers' and the student's shapes
  from their ``config.json`` files (as ``gkd validate`` does), the precision, micro-batch and
  sequence length from the config, and the features every stage's methods request from the
  methods themselves (their plan for the first forward pass);
* ``gkd plan --teacher 100B --student 10B --method kd --gpus 8 --gpu-memory 40GiB`` takes the
  shapes from sizes (named scales, :data:`gkd.parallel.planner.SCALES`) or ``key=value`` shapes.

The arithmetic is :mod:`gkd.parallel.planner`; this module turns configs and methods into its
workloads and prints the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from gkd.errors import GkdError
from gkd.parallel.planner import (
    DTYPE_BYTES,
    Architecture,
    Estimate,
    GiB,
    ModelUse,
    Plan,
    PlanError,
    Workload,
    architecture_from_spec,
    parse_bytes,
    plan,
)

DEFAULT_ROWS = 25
LOGITS = "logits"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


# ---------------------------------------------------------------------------------- methods


def _expand(pattern: str, layers: int) -> set[str]:
    """A declared feature pattern (``layers.{i}.output``) as the features of every layer."""
    if "{i}" in pattern:
        return {pattern.replace("{i}", str(i)) for i in range(layers)}
    return {pattern} if pattern != LOGITS and not pattern.startswith(LOGITS + ".") else set()


def requested_features(methods: Mapping[str, Any], layers: Mapping[str, int], notes: list[str] | None = None,
                       *, seed: int = 0) -> dict[str, set[str]]:
    """The features each model (``student``, ``teacher:NAME``) is asked for in the first
    forward pass of a step, merged over ``methods`` (``{name: SelectedMethod}``).

    A method whose plan needs the built models (Theseus runs teacher layers it takes in
    ``setup``) is represented by its declared feature patterns, every layer for ``{i}``;
    ``notes`` receives a line saying so.
    """
    from gkd.engine.step import step_context
    from gkd.methods.api import STUDENT
    from gkd.plugins.manager import get_plugin_manager

    merged: dict[str, set[str]] = {STUDENT: set()}
    for name, sel in methods.items():
        try:
            plan_ = sel.method.plan(step_context(seed, "plan", 0, 0, 0, 1, name), sel.state, 0, None)
        except Exception as exc:  # whatever a plan raises without its models, the declared patterns stand in
            spec = get_plugin_manager().registry.get(name).spec
            if notes is not None:
                notes.append(f"method '{name}': features from its declared patterns (its plan needs the built "
                             f"models: {str(exc).splitlines()[0]})")
            merged[STUDENT] |= {f for p in spec.features.student for f in _expand(p, layers[STUDENT])}
            for key in layers:
                if key != STUDENT and key in {f"teacher:{t}" for t in sel.method.context.teachers}:
                    merged.setdefault(key, set()).update(f for p in spec.features.teacher for f in _expand(p, layers[key]))
            continue
        if plan_ is None:
            continue
        for key, request in plan_.models.items():
            merged.setdefault(key, set()).update(request.features)
    return merged


def soft_teachers(methods: Mapping[str, Any]) -> set[str]:
    """Teachers (``teacher:NAME``) some method declares reading the logits of."""
    from gkd.methods.api import teacher_key
    from gkd.plugins.manager import get_plugin_manager

    registry = get_plugin_manager().registry
    out = set()
    for name, sel in methods.items():
        if any(p == LOGITS or p.startswith(LOGITS + ".") for p in registry.get(name).spec.features.teacher):
            out |= {teacher_key(t) for t in sel.method.context.teachers}
    return out


def auxiliary_parameters(methods: Mapping[str, Any]) -> int:
    """Trainable parameters the methods own (TinyBERT's ``W_h``, …)."""
    return sum(p.numel() for sel in methods.values() for p in sel.method.parameters() if p.requires_grad)


def build_methods_cheaply(build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)`` with parameters allocated on the ``meta`` device (shapes, no memory: the
    projections of a 100B teacher's methods would otherwise be allocated for nothing), or
    normally when a method's constructor needs real tensors."""
    import torch

    try:
        with torch.device("meta"):
            return build(*args)
    except (RuntimeError, NotImplementedError, TypeError):
        return build(*args)


def workload(name: str, student: Architecture, teachers: Mapping[str, tuple[Architecture, str]], methods: Mapping[str, Any],
             *, precision: str, micro_batch: int, seq_len: int, notes: list[str] | None = None,
             trains: str = "student") -> Workload:
    """A :class:`Workload` from the stage's models and its built methods (``{name: SelectedMethod}``)."""
    from gkd.methods.api import STUDENT, teacher_key

    layers = {STUDENT: student.num_layers} | {teacher_key(t): a.num_layers for t, (a, _) in teachers.items()}
    features = requested_features(methods, layers, notes)
    soft = soft_teachers(methods)
    uses = tuple(ModelUse(arch, frozenset(features.get(teacher_key(t), ())), teacher_key(t) in soft and arch.head != "none",
                          dtype, t) for t, (arch, dtype) in teachers.items() if teacher_key(t) in features)
    hard = not methods or any("hard_loss" in type(sel.method).exclusive(sel.method.config) for sel in methods.values())
    return Workload(ModelUse(student, frozenset(features[STUDENT]), True, precision, trains), uses,
                    auxiliary_parameters(methods), precision, micro_batch, seq_len, name, trains, hard)


# ---------------------------------------------------------------------------------- the two forms


def _shape(arch: Architecture) -> Any:
    from gkd.methods.api import ModelShape

    return ModelShape(arch.family, arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.kv_heads, arch.ffn_hidden_size,
                      arch.vocab_size, arch.num_labels if arch.head == "classification" else None, head=arch.head,
                      has_pooler=arch.pooler and arch.head != "mlm")


def workloads_from_sizes(teacher_specs: tuple[str, ...], student_spec: str, method_names: tuple[str, ...], *,
                         precision: str, teacher_dtype: str | None, micro_batch: int, seq_len: int,
                         notes: list[str]) -> list[Workload]:
    """One stage: the given teachers and student, each method with its default config."""
    from gkd.config.schema import apply_defaults
    from gkd.engine.step import SelectedMethod
    from gkd.methods.api import MethodContext
    from gkd.plugins.manager import get_plugin_manager

    def read(option: str, spec: str) -> Architecture:
        try:
            return architecture_from_spec(spec)
        except PlanError as exc:
            raise GkdError(f"{option}: {exc}") from None

    student = read("--student", student_spec)
    names = ["teacher"] if len(teacher_specs) == 1 else [f"teacher{i + 1}" for i in range(len(teacher_specs))]
    teachers = {n: (read("--teacher", s), teacher_dtype or precision) for n, s in zip(names, teacher_specs, strict=True)}
    for n, (arch, _) in teachers.items():
        if arch.vocab_size != student.vocab_size:
            raise GkdError(f"--teacher: {n}'s vocabulary ({arch.vocab_size}) differs from the student's "
                           f"({student.vocab_size}); every model of a step reads the same token ids (give vocab=...)")
    registry = get_plugin_manager().registry
    task = "causal_lm" if student.family == "decoder" else "sequence_classification"
    context = MethodContext(_shape(student), {n: _shape(a) for n, (a, _) in teachers.items()}, task, "task")
    methods = {}
    for name in method_names or (("kd",) if teachers else ()):
        try:
            spec = registry.get(name).spec
        except (GkdError, KeyError) as exc:
            raise GkdError(f"--method: {exc.args[0] if exc.args else exc}") from None
        if spec.factory is None:
            raise GkdError(f"--method {name}: the method has no implementation")
        config = apply_defaults(spec.config_schema, {})
        try:
            method = build_methods_cheaply(spec.factory, config, context)
        except (GkdError, ValueError) as exc:
            raise GkdError(f"--method {name}: {exc}") from None
        methods[name] = SelectedMethod(method, 1.0, method.initial_state())
    return [workload("sizes", student, teachers, methods, precision=precision, micro_batch=micro_batch,
                     seq_len=seq_len, notes=notes)]


def workloads_from_config(config: str, overrides: tuple[str, ...], *, precision: str | None, micro_batch: int | None,
                          seq_len: int | None, notes: list[str]) -> tuple[list[Workload], Any]:
    """One workload per stage of the run config (a ``train: teacher:NAME`` stage trains that
    teacher, alone); the shapes come from the checkpoints' ``config.json``."""
    from gkd.config import load_run_config
    from gkd.engine.build import build_methods
    from gkd.methods.api import ModelShape
    from gkd.models import ModelConfig
    from gkd.plugins.manager import get_plugin_manager

    registry = get_plugin_manager().registry
    run = load_run_config(config, overrides, registry=registry)
    task = run.task
    labels = {"num_labels": task.num_labels or 2} if task.head == "classification" else {}

    def read(path: Path, what: str, head: str | None = None, **extra: Any) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        try:
            hf = json.loads(cfg_path.read_text())
            return ModelConfig.from_hf_config(hf, head=head, **extra)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise GkdError(f"{what}: {cfg_path} does not exist (gkd plan reads the model's shape from it)") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise GkdError(f"{what}: cannot read the model shape from {cfg_path}: {exc}") from None

    def teacher_cfg(path: Path, what: str) -> ModelConfig:
        own = read(path, what)
        return read(path, what, task.head, **labels) if own.head == task.head else own

    known: dict[str, ModelConfig] = {t.name: teacher_cfg(t.path, f"teachers[{t.name}]") for t in run.teachers}
    dtypes = {t.name: t.dtype for t in run.teachers}
    student_cfg: ModelConfig | None = None
    out = []
    for index, stage in enumerate(run.stages):
        what = f"stages[{index}]"
        train_precision = precision or stage.training.precision
        batch = micro_batch or stage.training.batch_size
        seq = seq_len or task.max_length
        if stage.trains_teacher is not None:
            name = stage.trains_teacher
            cfg = read(run.teacher(name).path, f"{what}.train", task.head, **labels)
            known[name] = cfg  # later stages read the fine-tuned teacher, which has the task's head
            out.append(workload(stage.name, _arch(cfg, what), {}, {}, precision=train_precision, micro_batch=batch,
                                seq_len=seq, notes=notes, trains=f"teacher '{name}'"))
            continue
        init = stage.student_init or (run.student.init if student_cfg is None else None)
        if init is not None:
            where = f"{what}.student_init" if stage.student_init is not None else "student.init"
            student_cfg = _student_config(run, init, known, read, where)
        assert student_cfg is not None
        teachers = {t: known[t] for t in stage.used_teachers}
        shapes = {t: ModelShape.from_model_config(c) for t, c in teachers.items()}
        methods = build_methods_cheaply(build_methods, run, stage, registry, ModelShape.from_model_config(student_cfg),
                                        shapes)
        out.append(workload(stage.name, _arch(student_cfg, what),
                            {t: (_arch(c, f"teachers[{t}]"), dtypes.get(t, train_precision)) for t, c in teachers.items()},
                            methods, precision=train_precision, micro_batch=batch, seq_len=seq, notes=notes))
        if stage.publish_as_teacher:
            known[stage.publish_as_teacher] = student_cfg
            dtypes.setdefault(stage.publish_as_teacher, "fp32")  # as RunAssets.set_teacher_path loads a new one
    return out, run


def _student_config(run: Any, init: Any, known: Mapping[str, Any], read: Any, what: str) -> Any:
    """The student's :class:`ModelConfig` as :meth:`gkd.engine.assets.RunAssets.build_student` builds it:
    the source's shape (a teacher, possibly one published by an earlier stage, or a checkpoint)
    with the task's head, ``student.architecture`` and the depth of ``truncate`` / ``random``."""
    import dataclasses

    overrides = run.student.architecture.model_overrides()
    labels = {"num_labels": run.task.num_labels or 2} if run.task.head == "classification" else {}
    if init.teacher is not None:
        base = known[init.teacher]
    else:
        base = read(init.source_dir({}), f"{what}.path", run.task.head, **labels)
    if init.strategy in ("truncate", "random"):
        depth = len(init.layers) if isinstance(init.layers, tuple) else (init.num_layers or overrides.get("num_layers"))
        if depth is not None:
            overrides["num_layers"] = depth
    return dataclasses.replace(base, head=run.task.head, **labels, **overrides)


def _arch(cfg: Any, what: str) -> Architecture:
    try:
        return Architecture.from_model_config(cfg)
    except PlanError as exc:
        raise GkdError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------------- output


def _row(est: Estimate, fits: bool, marks: str) -> list[str]:
    lay = est.layout
    return [str(lay.tp), str(lay.dp), str(lay.zero), "yes" if lay.offload_optimizer else "no", lay.teacher,
            _gib(est.teachers), _gib(est.student), _gib(est.gradients), _gib(est.optimizer),
            _gib(est.activations), _gib(est.buffers + est.gathered), _gib(est.peak), _gib(est.host),
            ("yes" if fits else "no") + marks]


HEADERS = ["TP", "DP", "ZERO", "OFFLOAD", "TEACHER", "TEACHERS", "STUDENT", "GRADS", "OPTIM", "ACTIV", "BUFFERS",
           "PEAK", "HOST", "FITS"]


def describe(arch: Architecture) -> str:
    """``decoder 80×10240 (80 heads, ffn 27392, vocab 50304): 101.39B parameters``."""
    heads = f"{arch.num_attention_heads} heads" + (f", {arch.kv_heads} kv" if arch.kv_heads != arch.num_attention_heads else "")
    return (f"{arch.family} {arch.num_layers}×{arch.hidden_size} ({heads}, ffn {arch.ffn_hidden_size}, vocab "
            f"{arch.vocab_size}, head {arch.head}): {arch.num_parameters() / 1e9:.2f}B parameters")


def describe_workload(w: Workload) -> list[str]:
    """What a stage runs, in a few lines."""
    lines = [f"stage '{w.name}': {w.precision}, micro-batch {w.micro_batch} × {w.seq_len} tokens",
             f"  {w.trains}: {describe(w.student.arch)}" + (f" + {w.auxiliary_parameters:,} auxiliary" if
                                                         w.auxiliary_parameters else "")
             + (f"; features: {len(w.student.features)}" if w.student.features else "")]
    for t in w.teachers:
        lines.append(f"  teacher '{t.name}': {describe(t.arch)}, {t.dtype}; features: {len(t.features)}"
                     + (", logits" if t.logits else ""))
    return lines


def _recommendation(label: str, est: Estimate, usable: int) -> list[str]:
    return [f"{label}: {est.layout.label()} — peak {_gib(est.peak)} GiB of {_gib(usable)} GiB"
            + (f" (stage '{est.stage}')" if est.stage not in ("", "sizes") else ""),
            "  config: " + json.dumps(est.layout.config())]


def format_plan(result: Plan, workloads: list[Workload], *, rows: int | None, configured: Any = None) -> str:
    """The models, the table (sorted by peak), the recommendation or the shortfall."""
    best = result.recommended
    ordered = result.sorted()
    shown = ordered if rows is None else ordered[:rows]
    if best is not None and best not in shown:
        shown.append(best)
    table = []
    for est in shown:
        marks = (" ←" if est is best else "") + (" (config)" if configured == est.layout else "")
        table.append(_row(est, result.fits(est), marks))
    widths = [max(len(r[i]) for r in [HEADERS, *table]) for i in range(len(HEADERS))]
    lines = [line for w in workloads for line in describe_workload(w)]
    lines.append(f"{result.gpus} GPU(s) × {_gib(result.gpu_memory)} GiB, {_gib(result.reserve)} GiB reserved: "
                 f"{_gib(result.usable)} GiB usable per GPU; GiB per GPU (HOST: host memory per GPU)")
    lines += ["  ".join(c.ljust(w) if i in (3, 4, 13) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              .rstrip() for r in [HEADERS, *table]]
    if rows is not None and len(ordered) > rows:
        lines.append(f"… {len(ordered) - rows} more layout(s); --all shows every one")
    if best is not None:
        lines += _recommendation("recommended (ZeRO first, then more TP, then offload)", best, result.usable)
        whole = result.recommended_whole_teachers
        if whole is not None and whole is not best:
            lines += _recommendation("with whole teachers on every rank (the paper's strategy)", whole, result.usable)
        elif whole is None:
            lines.append("with whole teachers on every rank (the paper's strategy): nothing fits; the teachers must be "
                         "partitioned over the DP ranks or offloaded")
    else:
        lowest = min(result.estimates, key=lambda e: e.peak)
        lines.append(f"does not fit: the smallest peak, {_gib(lowest.peak)} GiB ({lowest.layout.label()}), exceeds "
                     f"the usable {_gib(result.usable)} GiB by {_gib(result.shortfall)} GiB per GPU")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def plan_json(result: Plan, workloads: list[Workload]) -> dict[str, Any]:
    """Everything :func:`format_plan` prints, as one mapping (bytes, not GiB)."""
    def recommendation(est: Estimate | None) -> dict[str, Any] | None:
        return None if est is None else est.to_dict() | {"config": est.layout.config()}

    def model(use: ModelUse) -> dict[str, Any]:
        a = use.arch
        return {"family": a.family, "layers": a.num_layers, "hidden": a.hidden_size, "heads": a.num_attention_heads,
                "kv_heads": a.kv_heads, "ffn": a.ffn_hidden_size, "vocab": a.vocab_size, "head": a.head,
                "parameters": a.num_parameters(), "dtype": use.dtype, "features": sorted(use.features),
                "name": use.name,
                "logits": use.logits}

    return {
        "gpus": result.gpus, "gpu_memory": result.gpu_memory, "reserve": result.reserve, "usable": result.usable,
        "host_memory_per_gpu": result.host_memory,
        "stages": [{"name": w.name, "precision": w.precision, "micro_batch": w.micro_batch, "seq_len": w.seq_len,
                    "student": model(w.student), "auxiliary_parameters": w.auxiliary_parameters,
                    "teachers": [model(t) for t in w.teachers]} for w in workloads],
        "layouts": [e.to_dict() | {"fits": result.fits(e)} for e in result.sorted()],
        "recommended": recommendation(result.recommended),
        "recommended_whole_teachers": recommendation(result.recommended_whole_teachers),
        "shortfall": result.shortfall,
        "notes": result.notes,
    }


# ---------------------------------------------------------------------------------- the command


def _bytes_option(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except PlanError as exc:
        raise GkdError(f"{name}: {exc}") from None


@click.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="GPUs per node.")
@click.option("--gpu-memory", required=True, metavar="SIZE", help="Memory of one GPU, e.g. 40GiB or 80GB.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes (TP stays within one).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Tokens per example (default: the config's task.max_length, else 512).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Examples per GPU and micro-step (default: the stage's training.batch_size, else 1).")
@click.option("--precision", type=click.Choice(sorted(DTYPE_BYTES)), default=None,
              help="Training precision (default: the stage's training.precision, else bf16).")
@click.option("--teacher", "teachers", multiple=True, metavar="SPEC",
              help="Without CONFIG: a teacher, as a size (100B) and/or key=value shape (layers=80,hidden=10240,heads=80).")
@click.option("--student", metavar="SPEC", default=None, help="Without CONFIG: the student, like --teacher.")
@click.option("--method", "methods", multiple=True, metavar="NAME",
              help="Without CONFIG: a method (default config) of the stage; default kd.")
@click.option("--teacher-dtype", type=click.Choice(sorted(DTYPE_BYTES)), default=None,
              help="Without CONFIG: the teachers' dtype (default: the precision).")
@click.option("--reserve", default="1GiB", show_default=True, metavar="SIZE",
              help="Memory per GPU kept free (CUDA context, fragmentation, communication buffers).")
@click.option("--host-memory", default=None, metavar="SIZE", help="Host memory of one node; offload must fit in it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
@click.option("--all", "show_all", is_flag=True, help=f"Show every layout (default: the {DEFAULT_ROWS} smallest peaks).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(config: str | None, gpus: int, gpu_memory: str, nodes: int, seq_len: int | None, micro_batch: int | None,
             precision: str | None, teachers: tuple[str, ...], student: str | None, methods: tuple[str, ...],
             teacher_dtype: str | None, reserve: str, host_memory: str | None, overrides: tuple[str, ...],
             show_all: bool, as_json: bool) -> None:
    """Predict per-GPU memory of every parallel layout and recommend one (CONFIG, or --teacher/--student sizes)."""
    memory = _bytes_option(gpu_memory, "--gpu-memory")
    kept = _bytes_option(reserve, "--reserve")
    host = _bytes_option(host_memory, "--host-memory")
    assert memory is not None and kept is not None
    if kept >= memory:
        raise GkdError(f"--reserve ({reserve}) leaves nothing of --gpu-memory ({gpu_memory})")
    notes: list[str] = []
    configured = None
    try:
        if config is not None:
            if teachers or student or methods or teacher_dtype:
                raise GkdError("--teacher, --student, --method and --teacher-dtype describe a run without CONFIG; "
                               "give either CONFIG or them")
            works, run = workloads_from_config(config, overrides, precision=precision, micro_batch=micro_batch,
                                               seq_len=seq_len, notes=notes)
            configured = _configured_layout(run, gpus * nodes)
        else:
            if student is None:
                raise GkdError("give CONFIG, or --student (and --teacher) sizes")
            if overrides:
                raise GkdError("--set needs CONFIG")
            works = workloads_from_sizes(teachers, student, methods, precision=precision or "bf16",
                                         teacher_dtype=teacher_dtype, micro_batch=micro_batch or 1,
                                         seq_len=seq_len or 512, notes=notes)
        result = plan(works, gpus_per_node=gpus, nodes=nodes, gpu_memory=memory, reserve=kept,
                      host_memory_per_node=host)
    except PlanError as exc:
        raise GkdError(str(exc)) from None
    result.notes.extend(notes)
    if as_json:
        click.echo(json.dumps(plan_json(result, works), indent=2))
    else:
        click.echo(format_plan(result, works, rows=None if show_all else DEFAULT_ROWS, configured=configured))


def _configured_layout(run: Any, world: int) -> Any:
    from gkd.parallel.planner import Layout

    teachers = run.teachers
    placement = "resident"
    if teachers:
        partition = any(getattr(t, "partition", "none") == "data_parallel" for t in teachers)
        cpu = any(t.offload == "cpu" for t in teachers)
        placement = {(False, False): "resident", (True, False): "partition", (False, True): "cpu",
                     (True, True): "partition+cpu"}[(partition, cpu)]
    tp = run.parallel.tensor_parallel
    zero = run.parallel.zero
    return Layout(tp, max(1, world // tp), zero.stage, zero.offload_optimizer, placement)  # type: ignore[arg-type]


plan_cmd.name = "plan"
__all__ = ["auxiliary_parameters", "format_plan", "plan_cmd", "plan_json", "requested_features", "workload",
           "workloads_from_config", "workloads_from_sizes"]
