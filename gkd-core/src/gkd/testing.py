"""A test kit for method authors, shipped with gkd-core so third-party plugins can use it too.

Two levels, usable together:

* **Unit level, no models** — :func:`shape`, :func:`build_method`, :func:`step`,
  :func:`outputs`: call a method's ``plan`` and ``loss`` on hand-made tensors and compare each
  term with its formula.
* **Through the real engine** — :func:`tiny_models` (seeded encoder or decoder teacher/student
  pairs built with :func:`gkd.models.build_model`), :func:`tiny_batch` (with padding and
  labels), :func:`run_step` (:func:`gkd.engine.step.distill_step`, the function training uses)
  and :func:`check_conformance`, the contract every method must meet, in one call.

A method that reads ``state`` (layer maps, counters) needs ``initial_state()`` first:
``build_method(..., with_state=True)`` returns ``(method, state)``, and :func:`run_step` calls
``initial_state()`` for a bare :class:`~gkd.methods.api.Method`.

Tiny models have ``TINY_HIDDEN`` = 32 wide layers with ``TINY_HEADS`` = 4 attention heads for
every model (so head-count rules such as TinyBERT's attention loss hold), a vocabulary of
``TINY_VOCAB`` = 100 ids, no dropout, and a classification head with ``TINY_LABELS`` = 3
classes (encoders) or a tied LM head (decoders, 2 key/value heads: grouped-query attention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args, overload

import torch
from torch import nn

from gkd.config.resolve import HEAD_FOR_TASK
from gkd.config.schema import apply_defaults, defaults_of, schema_issues
from gkd.engine.step import SelectedMethod, StepResult, distill_step, step_context
from gkd.errors import GkdError
from gkd.methods import losses
from gkd.methods.api import (
    STUDENT,
    Method,
    MethodContext,
    ModelShape,
    ModelView,
    PassPlan,
    PassView,
    StepContext,
    teacher_key,
)
from gkd.methods.checks import check_features, matches, validate_feature_patterns
from gkd.methods.spec import MethodSpec, StageKind
from gkd.plugins.manager import load_plugin_manager

if TYPE_CHECKING:
    from gkd.engine.teacher_cache import TeacherCache
    from gkd.models import GkdModel, ModelConfig

TINY_HIDDEN = 32
TINY_HEADS = 4
"""Attention heads of every tiny model and of :func:`shape` (student and teachers alike)."""
TINY_DECODER_KV_HEADS = 2
TINY_VOCAB = 100
TINY_LABELS = 3
TINY_FFN = 64

Family = Literal["encoder", "decoder"]
MASK_ID = 4
"""The ``[MASK]`` id of :func:`tiny_batch` for ``masked_lm`` (ids 0–4 are never drawn as tokens)."""


def default_task(family: str) -> str:
    """``sequence_classification`` for encoders, ``causal_lm`` for decoders."""
    return "causal_lm" if family == "decoder" else "sequence_classification"


# ---------------------------------------------------------------------------- unit level


def shape(family: str = "encoder", num_layers: int = 4, hidden_size: int = TINY_HIDDEN, num_attention_heads: int = TINY_HEADS,
          vocab_size: int = TINY_VOCAB, num_labels: int | None = TINY_LABELS, *, num_kv_heads: int | None = None,
          ffn_hidden_size: int | None = None, head: str | None = None, has_pooler: bool | None = None) -> ModelShape:
    """A :class:`ModelShape` for unit tests; every model gets ``num_attention_heads`` = ``TINY_HEADS`` unless told.

    ``head`` defaults to ``classification`` (encoders) or ``lm`` (decoders); ``num_labels`` is
    kept only for a classification head. ``has_pooler`` defaults to True for encoders.
    """
    head = head or ("lm" if family == "decoder" else "classification")
    pooler = has_pooler if has_pooler is not None else family == "encoder"
    return ModelShape(family, num_layers, hidden_size, num_attention_heads, num_kv_heads or num_attention_heads,
                      ffn_hidden_size or 4 * hidden_size, vocab_size, num_labels if head == "classification" else None,
                      head=head, has_pooler=pooler)


def _spec(name_or_spec: str | MethodSpec) -> MethodSpec:
    if isinstance(name_or_spec, MethodSpec):
        return name_or_spec
    return load_plugin_manager().registry.get(name_or_spec).spec


def validate_config(spec: MethodSpec, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` checked against the method's schema, then defaulted (as validation does).

    Raises:
        GkdError: One line per problem, each naming the field, e.g.
            ``kd: config.soft_loss: 'kll' is not one of ['kl', 'ce', 'mse']``.
    """
    given = dict(config or {})
    issues = schema_issues(spec.config_schema, given, prefix="config")
    if issues:
        raise GkdError("\n".join(f"{spec.name}: {issue.path or 'config'}: {issue.message}" for issue in issues))
    return dict(apply_defaults(spec.config_schema, given))


def _stage_kind(spec: MethodSpec, stage_kind: str | None) -> str:
    """``stage_kind`` checked against :data:`StageKind` and ``spec.stages`` (as run validation does)."""
    if stage_kind is None:
        return "task" if "task" in spec.stages else spec.stages[0]
    kinds = list(get_args(StageKind))
    if stage_kind not in kinds:
        raise GkdError(f"{spec.name}: stage_kind: {stage_kind!r} is not one of {kinds}")
    if stage_kind not in spec.stages:
        raise GkdError(f"{spec.name}: stage_kind: method '{spec.name}' applies to {'/'.join(spec.stages)} stages, "
                       f"not to a '{stage_kind}' stage")
    return stage_kind


def _check_tensor_parallel(name: str, ctx: MethodContext) -> None:
    """The TP size must shard every model evenly (``parallel.tensor_parallel`` validation)."""
    tp = ctx.tensor_parallel
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise GkdError(f"{name}: tensor_parallel: expected a positive integer, got {tp!r}")
    models = [("the student", ctx.student), *((f"teacher '{n}'", s) for n, s in ctx.teachers.items())]
    for who, s in models:
        for value, label in ((s.num_attention_heads, "attention heads"), (s.num_kv_heads, "key/value heads"),
                             (s.ffn_hidden_size, "FFN width")):
            if value % tp:
                raise GkdError(f"{name}: tensor_parallel: {tp} must divide the {label} of {who} ({value})")


def _default_teachers(spec: MethodSpec) -> dict[str, ModelShape]:
    if spec.kind == "multi-teacher":
        return {"t1": shape(), "t2": shape(num_layers=3)}
    return {"t": shape()}


def context_of(models: Mapping[str, nn.Module], *, teachers: Sequence[str] | None = None, task: str | None = None,
               stage_kind: str = "task", tensor_parallel: int = 1) -> MethodContext:
    """The :class:`MethodContext` of tiny (or any gkd) models, from their ``model_config``.

    Args:
        models: ``{"student": …, "teacher:NAME": …}`` as :func:`tiny_models` returns.
        teachers: Teacher names the method reads, in order (default: every teacher in ``models``).
    """
    def shape_of(key: str) -> ModelShape:
        return ModelShape.from_model_config(models[key].model_config)  # type: ignore[union-attr]

    names = list(teachers) if teachers is not None else [k.split(":", 1)[1] for k in models if k != STUDENT]
    student = shape_of(STUDENT)
    return MethodContext(student=student, teachers={n: shape_of(teacher_key(n)) for n in names},
                         task=task or default_task(student.family), stage_kind=stage_kind,
                         tensor_parallel=tensor_parallel)


@overload
def build_method(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *,
                 student: ModelShape | None = None, teachers: Mapping[str, ModelShape] | Sequence[str] | None = None,
                 task: str | None = None, stage_kind: str | None = None, tensor_parallel: int = 1,
                 models: Mapping[str, nn.Module] | None = None, seed: int | None = None, check: bool = True,
                 with_state: Literal[False] = False) -> Method: ...
@overload
def build_method(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *,
                 student: ModelShape | None = None, teachers: Mapping[str, ModelShape] | Sequence[str] | None = None,
                 task: str | None = None, stage_kind: str | None = None, tensor_parallel: int = 1,
                 models: Mapping[str, nn.Module] | None = None, seed: int | None = None, check: bool = True,
                 with_state: Literal[True]) -> tuple[Method, dict[str, Any]]: ...
def build_method(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *,
                 student: ModelShape | None = None, teachers: Mapping[str, ModelShape] | Sequence[str] | None = None,
                 task: str | None = None, stage_kind: str | None = None, tensor_parallel: int = 1,
                 models: Mapping[str, nn.Module] | None = None, seed: int | None = None, check: bool = True,
                 with_state: bool = False) -> Method | tuple[Method, dict[str, Any]]:
    """Build a method as gkd does: validate ``config`` against its schema, fill the defaults,
    run the static checks (:func:`gkd.methods.checks.check_features`), call the factory.

    Args:
        name: A registered method name (installed plugins are loaded afresh), or a
            :class:`MethodSpec` (for a method that is not installed).
        config: The method's ``config``; an unknown key or a wrong value raises.
        student, teachers: Shapes (``{name: ModelShape}``); default a 2-layer ``shape()`` student
            and one 4-layer teacher ``t`` (multi-teacher methods: ``t1`` with 4 layers and ``t2``
            with 3). With ``models``, ``teachers`` may be the names of the teachers to read.
        task: Default ``sequence_classification`` (encoder student) or ``causal_lm``.
        stage_kind: ``"pretrain"`` or ``"task"``, one of ``spec.stages`` (default ``"task"`` when
            the method applies to task stages, else its first stage kind).
        tensor_parallel: The TP size of :class:`MethodContext`; it must divide the attention
            heads, key/value heads and FFN width of every model, as validation requires.
        models: Tiny models (:func:`tiny_models`): shapes come from their configs instead.
        seed: Seed the method's parameter initialisation (the global RNG is left untouched).
        check: False skips :func:`check_features` (e.g. to test the constructor's own error).
        with_state: Return ``(method, method.initial_state())``.

    Raises:
        GkdError: An invalid config (each field named), a stage kind the method does not apply
            to, a TP size that does not divide the models, or an issue of the static checks
            (``config.<field>: message``).
    """
    spec = _spec(name)
    cfg = validate_config(spec, config)
    stage_kind = _stage_kind(spec, stage_kind)
    if models is not None:
        names = list(teachers) if teachers is not None and not isinstance(teachers, Mapping) else None
        ctx = context_of(models, teachers=names, task=task, stage_kind=stage_kind, tensor_parallel=tensor_parallel)
        if student is not None or isinstance(teachers, Mapping):
            ctx = MethodContext(student or ctx.student, dict(teachers) if isinstance(teachers, Mapping) else ctx.teachers,
                                ctx.task, stage_kind, tensor_parallel)
    else:
        if teachers is not None and not isinstance(teachers, Mapping):
            raise TypeError("teachers as a list of names needs models=; give {name: ModelShape} otherwise")
        s = student or shape(num_layers=2)
        ctx = MethodContext(student=s, teachers=dict(teachers) if teachers is not None else _default_teachers(spec),
                            task=task or default_task(s.family), stage_kind=stage_kind, tensor_parallel=tensor_parallel)
    _check_tensor_parallel(spec.name, ctx)
    if check:
        issues = check_features(spec, cfg, ctx)
        if issues:
            raise GkdError("\n".join(f"config.{i.field}: {i.message}" if i.field else i.message for i in issues))
    if spec.factory is None:
        raise GkdError(f"method '{spec.name}' has no factory")
    if seed is None:
        method = spec.factory(cfg, ctx)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            method = spec.factory(cfg, ctx)
    return (method, method.initial_state()) if with_state else method


def step(iteration: int = 0, total: int = 10, seed: int = 0, *, stage: str = "test", epoch: int = 0) -> StepContext:
    """A :class:`StepContext` whose generator is ``torch.Generator().manual_seed(seed)``;
    ``progress`` is ``iteration / total``."""
    return StepContext(stage, 0, epoch, iteration, total, torch.Generator().manual_seed(seed))


def outputs(batch: Mapping[str, torch.Tensor], student: ModelView, teachers: Mapping[str, ModelView] | None = None,
            *, terms: Mapping[str, torch.Tensor] | None = None) -> PassView:
    """A :class:`PassView` from a batch and hand-made :class:`ModelView` s.

    When ``batch`` has ``labels``, a view with logits and no ``task_loss`` gets ``task_loss``
    and ``task_loss_per_example`` computed from them by :func:`gkd.methods.losses.task_loss`
    and :func:`~gkd.methods.losses.task_loss_per_example`, the functions the engine uses, so a
    test of a hard term checks the real value. A ``task_loss`` you pass is kept.
    """
    labels = batch.get("labels")

    def complete(view: ModelView) -> ModelView:
        if labels is None or view.logits is None or view.task_loss is not None:
            return view
        return ModelView(view.features, view.logits, losses.task_loss(view.logits, labels),
                         losses.task_loss_per_example(view.logits, labels))

    models = {STUDENT: complete(student)} | {teacher_key(k): complete(v) for k, v in (teachers or {}).items()}
    return PassView(batch=dict(batch), models=models, terms=dict(terms or {}))


# ---------------------------------------------------------------------------- real models


def tiny_config(family: Family = "encoder", num_layers: int = 2, *, task: str | None = None, head: str | None = None,
                hidden_size: int = TINY_HIDDEN, num_attention_heads: int = TINY_HEADS, num_kv_heads: int | None = None,
                ffn_hidden_size: int = TINY_FFN, vocab_size: int = TINY_VOCAB, num_labels: int = TINY_LABELS,
                **overrides: Any) -> ModelConfig:
    """The :class:`~gkd.models.ModelConfig` of a tiny model (no dropout, 64 positions).

    ``head`` defaults to the task's (``classification``, ``mlm`` or ``lm``); ``head="none"``
    gives a model without logits. Decoders default to ``TINY_DECODER_KV_HEADS`` key/value heads.
    """
    from gkd.models import ModelConfig

    head = head or HEAD_FOR_TASK[task or default_task(family)]
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                                  num_attention_heads=num_attention_heads, ffn_hidden_size=ffn_hidden_size, head=head,
                                  num_labels=num_labels, hidden_dropout=0.0, attention_dropout=0.0,
                                  max_position_embeddings=64)
    if family == "decoder":
        common |= dict(num_kv_heads=num_kv_heads or min(TINY_DECODER_KV_HEADS, num_attention_heads), hidden_act="silu",
                       norm_eps=1e-6)
    elif num_kv_heads is not None:
        common["num_kv_heads"] = num_kv_heads
    return ModelConfig(family=family, **(common | overrides))


def tiny_models(family: Family = "encoder", *, teacher_layers: int = 4, student_layers: int = 2,
                teachers: Sequence[str] | Mapping[str, int] = ("t",), task: str | None = None,
                teacher_head: str | None = None, student_hidden_size: int = TINY_HIDDEN,
                teacher_hidden_size: int = TINY_HIDDEN, num_attention_heads: int = TINY_HEADS, seed: int = 0,
                device: torch.device | str = "cpu") -> dict[str, GkdModel]:
    """A student and its teachers, tiny real gkd models (megatron-core), seeded.

    Args:
        family: ``"encoder"`` (BERT-like) or ``"decoder"`` (Llama-like) for every model.
        teacher_layers, student_layers: Depths; ``teachers`` as a mapping gives each teacher's.
        teachers: Teacher names, or ``{name: num_layers}`` (e.g. two teachers of different depth).
        task: Sets the heads (default :func:`default_task`).
        teacher_head: Another head for the teachers, e.g. ``"none"`` (no logits).
        student_hidden_size, teacher_hidden_size, num_attention_heads: Widths and heads.
        seed: The student is built with ``seed``, teacher k with ``seed + 1 + k``.

    Returns:
        ``{"student": model in train mode, "teacher:NAME": model in eval mode with
        requires_grad False}``, as the trainer hands them to :func:`distill_step`.
    """
    from gkd.models import build_model

    depths = dict(teachers) if isinstance(teachers, Mapping) else dict.fromkeys(teachers, teacher_layers)
    task = task or default_task(family)
    models: dict[str, GkdModel] = {
        STUDENT: build_model(tiny_config(family, student_layers, task=task, hidden_size=student_hidden_size,
                                         num_attention_heads=num_attention_heads), seed=seed, device=device).train()}
    for k, (name, layers) in enumerate(depths.items()):
        cfg = tiny_config(family, layers, task=task, head=teacher_head, hidden_size=teacher_hidden_size,
                          num_attention_heads=num_attention_heads)
        teacher = build_model(cfg, seed=seed + 1 + k, device=device).eval()
        models[teacher_key(name)] = teacher.requires_grad_(False)
    return models


def tiny_batch(family: Family = "encoder", task: str | None = None, *, batch: int = 2, seq: int = 8,
               vocab_size: int = TINY_VOCAB, num_labels: int = TINY_LABELS, generator: torch.Generator | None = None,
               labels: bool = True, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch like the engine's (see :mod:`gkd.engine.data`), with padding in it.

    The last example's last ``seq // 3`` positions are padding (``attention_mask`` 0, id 0).
    Labels: ``[b]`` classes (``sequence_classification``); ``[b, s]`` with ``-100`` where no
    loss is taken for the LM tasks — ``causal_lm`` already shifted (``labels[:, t]`` is the
    token at ``t + 1``), ``masked_lm`` on about a quarter of the real tokens (at least one per
    example), replaced by ``MASK_ID`` in ``input_ids``. Encoders get zero ``token_type_ids``.
    """
    task = task or default_task(family)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ids = torch.randint(MASK_ID + 1, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - max(1, seq // 3):] = 0
    ids = ids * mask
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if family == "encoder":
        out["token_type_ids"] = torch.zeros_like(ids)
    if labels:
        if task == "sequence_classification":
            out["labels"] = torch.randint(0, num_labels, (batch,), generator=g)
        elif task == "causal_lm":
            lab = torch.full_like(ids, -100)
            lab[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
            out["labels"] = lab
        elif task == "masked_lm":
            chosen = (torch.rand(batch, seq, generator=g) < 0.25) & mask.bool()
            chosen[torch.arange(batch), 0] = True  # at least one masked token per example
            out["labels"] = torch.where(chosen, ids, -100)
            out["input_ids"] = torch.where(chosen, MASK_ID, ids)
        else:
            raise ValueError(f"unknown task {task!r}; use one of {sorted(HEAD_FOR_TASK)}")
    return {k: v.to(device) for k, v in out.items()}


def selected(method: Method, weight: float = 1.0, state: dict[str, Any] | None = None) -> SelectedMethod:
    """A method as a stage uses it: with its weight and (default: its initial) state."""
    return SelectedMethod(method, weight, method.initial_state() if state is None else state)


def _as_selected(methods: Method | SelectedMethod | Mapping[str, Method | SelectedMethod]) -> dict[str, SelectedMethod]:
    if isinstance(methods, (Method, SelectedMethod)):
        methods = {(methods.method if isinstance(methods, SelectedMethod) else methods).name: methods}
    return {name: m if isinstance(m, SelectedMethod) else selected(m) for name, m in methods.items()}


def run_step(methods: Method | SelectedMethod | Mapping[str, Method | SelectedMethod], models: Mapping[str, nn.Module],
             batch: Mapping[str, torch.Tensor], *, iteration: int = 0, total: int = 10, seed: int = 0,
             stage: str = "test", epoch: int = 0, setup: bool = True, after_step: bool = False,
             cache: TeacherCache | None = None) -> StepResult:
    """One training step's forward passes and losses, by the engine's :func:`distill_step`.

    Args:
        methods: One method, or ``{name: method}`` combined in one stage (in order). A bare
            :class:`Method` gets weight 1 and a fresh ``initial_state()`` on every call; pass a
            :class:`SelectedMethod` (:func:`selected`) to keep its state across steps.
        models: ``{"student": …, "teacher:NAME": …}`` (:func:`tiny_models`).
        batch: A batch (:func:`tiny_batch`).
        iteration, total, seed, stage, epoch: Where the step is; each method's generator is
            seeded from (seed, stage, iteration, method name), as in training.
        setup: Call ``method.setup(models)`` first.
        after_step: Then call ``method.after_step`` with the step's term values, as the trainer
            does once per optimizer step (``{term: float}``, unweighted names without the method).
        cache: A teacher cache (:meth:`gkd.engine.teacher_cache.TeacherCache.for_models`) to serve
            the teachers from, as ``cache: auto`` does in training.

    Returns:
        The :class:`StepResult`: ``loss`` (with its graph; call ``backward()``) and ``terms``.
    """
    sel = _as_selected(methods)
    if setup:
        for s in sel.values():
            s.method.setup(models)
    contexts = {name: step_context(seed, stage, 0, epoch, iteration, total, name) for name in sel}
    result = distill_step(models, sel, contexts, batch, cache=cache)
    if after_step:
        for name, s in sel.items():
            logged = {k.split(".", 1)[1]: float(v.detach()) for k, v in result.terms.items() if k.startswith(name + ".")}
            s.method.after_step(contexts[name], s.state, logged)
    return result


# ---------------------------------------------------------------------------- conformance


@dataclass
class Conformance:
    """What :func:`check_conformance` ran: per step, the plans (model key → requested features
    per pass) and the term values."""

    plans: list[list[dict[str, frozenset[str]]]] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)


def _json_round_trip(state: Any, name: str, when: str) -> None:
    if not isinstance(state, dict):
        raise AssertionError(f"{name}: the state {when} must be a dict, got {type(state).__name__}")
    try:
        again = json.loads(json.dumps(state))
    except (TypeError, ValueError) as e:
        raise AssertionError(f"{name}: the state {when} is not JSON-serialisable ({e}): {state!r}") from None
    if again != state:
        raise AssertionError(f"{name}: the state {when} changes in a JSON round trip (tuples, int keys?): "
                             f"{state!r} -> {again!r}")


def _recording(method: Method, sink: list[PassPlan]) -> Callable[..., PassPlan | None]:
    original = type(method).plan

    def plan(step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        result = original(method, step, state, pass_index, previous)
        if result is not None:
            sink.append(result)
        return result

    return plan


def _check_plans(spec: MethodSpec, plans: list[PassPlan], ctx: MethodContext) -> None:
    allowed = {STUDENT} | {teacher_key(t) for t in ctx.teachers}
    for p, plan in enumerate(plans):
        for key, req in plan.models.items():
            if key not in allowed:
                raise AssertionError(f"{spec.name}: pass {p} plans model '{key}', but the method reads only "
                                     f"{sorted(allowed)}")
            patterns = spec.features.student if key == STUDENT else spec.features.teacher
            side = "student" if key == STUDENT else "teacher"
            for feature in sorted(req.features | req.candidates):
                if not any(matches(pat, feature) for pat in patterns):
                    what = "requests" if feature in req.features else "lists the candidate"
                    raise AssertionError(
                        f"{spec.name}: pass {p} {what} '{feature}' from {key}, which no {side} pattern of "
                        f"spec.features matches ({', '.join(patterns) or 'none declared'})")
            if req.candidates and key == STUDENT:
                raise AssertionError(f"{spec.name}: pass {p} lists candidates for the student; only teachers are cached")
            if req.operations and not spec.modifies_forward:
                raise AssertionError(f"{spec.name}: pass {p} attaches operations at {sorted(req.operations)} on {key}, "
                                     "but the spec says modifies_forward=False")


def _check_holds_no_model(name: str, method: Method, models: Mapping[str, nn.Module], when: str) -> None:
    model_params = {id(p) for m in models.values() for p in m.parameters()}
    held = [n for n, p in method.named_parameters() if id(p) in model_params]
    ids = {id(m) for m in models.values()}
    modules = [n for n, m in method.named_modules() if id(m) in ids]
    if held or modules:
        raise AssertionError(f"{name}: the method holds a model as a sub-module {when} ({(modules or held)[:3]}); "
                             "teachers would join the trained auxiliary model: keep the references setup() gives "
                             "in a plain dict")


def _run_checked(spec: MethodSpec, sel: SelectedMethod, models: Mapping[str, nn.Module],
                 batches: Sequence[Mapping[str, torch.Tensor]], seed: int, check_grads: bool,
                 own_grads: bool) -> Conformance:
    method, name, ctx = sel.method, spec.name, sel.method.context
    report = Conformance()
    teachers = [m for k, m in models.items() if k != STUDENT]
    for iteration, batch in enumerate(batches):
        recorded: list[PassPlan] = []
        method.plan = _recording(method, recorded)  # type: ignore[method-assign]
        try:
            if check_grads:
                for t in teachers:
                    t.requires_grad_(True)
                for p in [*models[STUDENT].parameters(), *method.parameters(), *(q for t in teachers for q in t.parameters())]:
                    p.grad = None
            result = run_step({name: sel}, models, batch, iteration=iteration, total=len(batches), seed=seed)
            _check_plans(spec, recorded, ctx)
            if not result.terms:
                raise AssertionError(f"{name}: the step produced no term")
            for term, value in result.terms.items():
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise AssertionError(f"{name}: term '{term}' must be a scalar tensor, got "
                                         f"{getattr(value, 'shape', type(value).__name__)}")
                if not torch.isfinite(value).all():
                    raise AssertionError(f"{name}: term '{term}' is not finite: {float(value.detach())}")
            if check_grads:
                if not result.loss.requires_grad:
                    raise AssertionError(f"{name}: the loss has no autograd graph; no gradient reaches the student")
                result.loss.backward()
                student_grads = [p.grad for p in models[STUDENT].parameters() if p.grad is not None]
                if not any(bool(torch.any(g != 0)) for g in student_grads):
                    raise AssertionError(f"{name}: the loss gives the student no (non-zero) gradient")
                bad = [n for n, p in models[STUDENT].named_parameters() if p.grad is not None
                       and not torch.isfinite(p.grad).all()]
                if bad:
                    raise AssertionError(f"{name}: non-finite student gradients in {bad[:5]}")
                if own_grads and not any(p.grad is not None for p in method.parameters()):
                    raise AssertionError(f"{name}: spec.has_parameters=True, but no gradient reaches the method's "
                                         "own parameters (pass parameter_grads=False if this config leaves them unused)")
                grad_teachers = {k for plan in recorded for k, r in plan.models.items() if r.grad}
                for key, t in models.items():
                    if key == STUDENT or key in grad_teachers:
                        continue
                    leaked = [n for n, p in t.named_parameters() if p.grad is not None]
                    if leaked:
                        raise AssertionError(f"{name}: {key} received gradients ({leaked[:3]}…) without asking for "
                                             "ForwardRequest(grad=True): teachers must stay frozen")
        finally:
            del method.plan
            for t in teachers:
                t.requires_grad_(False)
        _json_round_trip(sel.state, name, f"after plan/loss of step {iteration}")
        logged = {k.split(".", 1)[1]: float(v.detach()) for k, v in result.terms.items()}
        method.after_step(step_context(seed, "test", 0, 0, iteration, len(batches), name), sel.state, logged)
        _json_round_trip(sel.state, name, f"after after_step of step {iteration}")
        report.plans.append([{k: frozenset(r.features) for k, r in plan.models.items()} for plan in recorded])
        report.terms.append(logged)
        report.states.append(json.loads(json.dumps(sel.state)))
    return report


def check_conformance(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *,
                      family: Family = "encoder", task: str | None = None,
                      teachers: Sequence[str] | Mapping[str, int] | None = None, student_layers: int = 2,
                      teacher_layers: int = 4, steps: int = 2, seed: int = 0,
                      parameter_grads: bool | None = None) -> Conformance:
    """Check the contract of a method on tiny real models through the engine's ``distill_step``.

    It asserts that:

    * the schema's defaults validate against the schema, and the spec's feature patterns
      are well formed (:func:`gkd.methods.checks.validate_feature_patterns`);
    * ``config`` validates and the static checks pass for the tiny models;
    * ``spec.has_parameters`` matches the method's parameters, and the method holds no model
      (teacher or student) as a sub-module;
    * every plan names only the student and this method's teachers, requests only features
      matched by ``spec.features``, and attaches operations only if ``spec.modifies_forward``;
    * every term is a finite scalar, the loss is differentiable, gradients reach the student
      (and the method's parameters when ``spec.has_parameters``, see ``parameter_grads``) and
      never a teacher that did not ask for ``grad=True``;
    * the state is a dict that survives a JSON round trip, from ``initial_state()``, after each
      step and after each ``after_step``;
    * a second method built the same way gives the same plans, terms and states (same seed,
      same generator: same random choices).

    Args:
        name: A registered method name, or its :class:`MethodSpec`.
        config: The method's config (default: the schema's defaults).
        family, task: The tiny models' family and task (default :func:`default_task`).
        teachers: Teacher names or ``{name: num_layers}``; default one teacher ``t`` with
            ``teacher_layers`` layers, or for a multi-teacher method ``t1`` (``teacher_layers``)
            and ``t2`` (``teacher_layers - 1``).
        steps: Steps run, each on its own batch, with state carried over.
        seed: Models, batches, parameter initialisation and step generators.
        parameter_grads: Require gradients in the method's own parameters (default
            ``spec.has_parameters``); False for a config that leaves them unused.

    Returns:
        What ran (:class:`Conformance`), for further assertions.

    Raises:
        AssertionError: The first broken rule, naming the method and what is wrong.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    spec = _spec(name)
    try:
        Draft202012Validator.check_schema(dict(spec.config_schema))
    except SchemaError as e:
        raise AssertionError(f"{spec.name}: invalid config schema: {e.message}") from None
    defaults = defaults_of(spec.config_schema)
    bad_defaults = schema_issues(spec.config_schema, defaults, prefix="config")
    if bad_defaults:
        raise AssertionError(f"{spec.name}: the schema rejects its own defaults: " + "; ".join(map(str, bad_defaults)))
    problems = validate_feature_patterns(spec.features)
    if problems:
        raise AssertionError(f"{spec.name}: spec.features: " + "; ".join(problems))
    if teachers is None:
        teachers = ({"t1": teacher_layers, "t2": max(student_layers, teacher_layers - 1)}
                    if spec.kind == "multi-teacher" else {"t": teacher_layers})
    models = tiny_models(family, teachers=teachers, teacher_layers=teacher_layers, student_layers=student_layers,
                         task=task, seed=seed)
    try:
        first = build_method(spec, config, models=models, task=task, seed=seed)
        second = build_method(spec, config, models=models, task=task, seed=seed)
    except GkdError as e:
        raise AssertionError(f"{spec.name}: cannot build on the tiny models: {e}") from None

    _check_holds_no_model(spec.name, first, models, "after construction")
    own = list(first.parameters())
    if spec.has_parameters != bool(own):
        raise AssertionError(f"{spec.name}: spec.has_parameters={spec.has_parameters}, but the method owns "
                             f"{len(own)} parameter tensor(s)")

    state = first.initial_state()
    _json_round_trip(state, spec.name, "from initial_state()")
    g = torch.Generator().manual_seed(seed)
    batches = [tiny_batch(family, task, generator=g) for _ in range(steps)]
    own_grads = spec.has_parameters if parameter_grads is None else parameter_grads
    first.setup(models)
    _check_holds_no_model(spec.name, first, models, "after setup()")
    report = _run_checked(spec, SelectedMethod(first, 1.0, state), models, batches, seed, check_grads=True,
                          own_grads=own_grads)
    again = _run_checked(spec, SelectedMethod(second, 1.0, second.initial_state()), models, batches, seed,
                         check_grads=False, own_grads=False)
    for i, (a, b) in enumerate(zip(report.plans, again.plans, strict=True)):
        if a != b:
            raise AssertionError(f"{spec.name}: step {i} plans differ between two identical runs (randomness not "
                                 f"from step.generator?): {a} vs {b}")
    for i, (a, b) in enumerate(zip(report.terms, again.terms, strict=True)):
        if a.keys() != b.keys() or any(not math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7) for k in a):
            raise AssertionError(f"{spec.name}: step {i} terms differ between two identical runs: {a} vs {b}")
    for i, (a, b) in enumerate(zip(report.states, again.states, strict=True)):
        if a != b:
            raise AssertionError(f"{spec.name}: state after step {i} differs between two identical runs: {a} vs {b}")
    return report


# ---------------------------------------------------------------------------- teacher cache


@dataclass
class CacheReport:
    """What :func:`check_cache` ran."""

    served: int
    """Teacher batches served from the cache (0: every request of the method ran the teacher)."""
    computed: int
    """Teacher batches computed (and, where allowed, written)."""
    reason: str | None
    """Why a request could not be served (``None`` when every one could)."""
    terms: list[dict[str, float]] = field(default_factory=list)
    """The cached run's terms, step by step."""


def _ragged_batches(family: Family, task: str, lengths: Sequence[int], order: Sequence[int], pad_to: int,
                    generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Examples of ``lengths`` tokens (fixed by ``generator``), batched in ``order`` (pairs),
    right-padded to ``pad_to`` positions."""
    rows = []
    for n in lengths:
        full = tiny_batch(family, task, batch=1, seq=n, generator=generator)
        rows.append({k: v[0] for k, v in full.items()})
    batches = []
    for start in range(0, len(order), 2):
        chosen = [rows[i] for i in order[start:start + 2]]
        batch: dict[str, torch.Tensor] = {}
        for name in chosen[0]:
            if chosen[0][name].dim() == 0:
                batch[name] = torch.stack([r[name] for r in chosen])
                continue
            fill = -100 if name == "labels" else 0
            batch[name] = torch.stack([torch.nn.functional.pad(r[name], (0, pad_to - r[name].shape[0]), value=fill)
                                       for r in chosen])
        batch["attention_mask"] = torch.stack([
            (torch.arange(pad_to) < lengths[i]).long() for i in order[start:start + 2]])
        batches.append(batch)
    return batches


def check_cache(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *, family: Family = "encoder",
                task: str | None = None, teachers: Sequence[str] | Mapping[str, int] | None = None,
                student_layers: int = 2, teacher_layers: int = 4, seed: int = 0, precision: str = "exact",
                rtol: float = 1e-4, directory: Any = None) -> CacheReport:
    """Check that a method gives the same terms with a teacher cache as without.

    Four examples of different lengths are trained on in three "epochs": the first fills the
    cache; the second repeats its batches (as a second run over the same data does) and, in
    ``exact`` precision, must give identical terms, bit for bit — so a method that reads the
    teacher's padding positions fails here; the third reshuffles the examples and pads them
    longer, and its terms must agree within ``rtol`` (the teacher's outputs for an example differ
    between batch layouts by float reassociation; a cache serves the first layout's).

    Each step runs twice on identical methods, uncached and cached, and their terms are compared.

    Args:
        name, config, family, task, teachers, student_layers, teacher_layers, seed: As for
            :func:`check_conformance`.
        precision: ``exact``, or ``compressed`` (then every comparison uses ``rtol``).
        rtol: Relative tolerance of the reshuffled epoch (and of ``compressed``).
        directory: Where the cache lives (default: a temporary directory, removed afterwards).

    Returns:
        :class:`CacheReport`: how many teacher batches were served, and why not where not.

    Raises:
        AssertionError: A term differs between the cached and the uncached run.
    """
    import tempfile
    from pathlib import Path

    from gkd.config.run import CacheConfig
    from gkd.engine.teacher_cache import TeacherCache

    spec = _spec(name)
    task = task or default_task(family)
    if teachers is None:
        teachers = ({"t1": teacher_layers, "t2": max(student_layers, teacher_layers - 1)}
                    if spec.kind == "multi-teacher" else {"t": teacher_layers})
    models = tiny_models(family, teachers=teachers, teacher_layers=teacher_layers, student_layers=student_layers,
                         task=task, seed=seed)
    plain = build_method(spec, config, models=models, task=task, seed=seed)
    cached = build_method(spec, config, models=models, task=task, seed=seed)
    plain.setup(models)
    cached.setup(models)
    lengths = [9, 5, 3, 7]
    first = _ragged_batches(family, task, lengths, [0, 1, 2, 3], 9, torch.Generator().manual_seed(seed))
    shuffled = _ragged_batches(family, task, lengths, [2, 0, 3, 1], 12, torch.Generator().manual_seed(seed))
    epochs = [(b, "fill") for b in first] + [(b, "repeat") for b in first] + [(b, "reshuffled") for b in shuffled]
    with contextlib.ExitStack() as stack:
        root = Path(directory) if directory is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = CacheConfig("auto", precision)  # type: ignore[arg-type]
        cache = TeacherCache.for_models(settings, root, models)
        reasons: list[str] = []
        original = cache.why_not

        def why_not(key: str, request: Any, teacher_grad: bool = False) -> str | None:
            reason = original(key, request, teacher_grad)
            if reason is not None:
                reasons.append(reason)
            return reason

        cache.why_not = why_not  # type: ignore[method-assign]
        a_state, b_state = plain.initial_state(), cached.initial_state()
        report_terms = []
        for i, (batch, kind) in enumerate(epochs):
            def ctx(i: int = i) -> dict[str, StepContext]:  # one per run: the step consumes its generator
                return {spec.name: step_context(seed, "test", 0, i // 2, i, len(epochs), spec.name)}

            a = distill_step(models, {spec.name: SelectedMethod(plain, 1.0, a_state)}, ctx(), batch)
            b = distill_step(models, {spec.name: SelectedMethod(cached, 1.0, b_state)}, ctx(), batch, cache=cache)
            a_terms = {k: float(v.detach()) for k, v in a.terms.items()}
            b_terms = {k: float(v.detach()) for k, v in b.terms.items()}
            exact = precision == "exact" and kind != "reshuffled"
            same = a.terms.keys() == b.terms.keys() and all(
                torch.equal(a.terms[k].detach(), b.terms[k].detach()) if exact else
                math.isclose(a_terms[k], b_terms[k], rel_tol=rtol, abs_tol=rtol * 1e-3) for k in a.terms)
            if not same:
                how = "bit for bit" if exact else f"within rtol {rtol}"
                raise AssertionError(f"{spec.name}: step {i} ({kind} batch) terms differ {how} with the teacher "
                                     f"cache: uncached {a_terms}, cached {b_terms}")
            report_terms.append(b_terms)
            for method, state, terms in ((plain, a_state, a_terms), (cached, b_state, b_terms)):
                own = {k.split(".", 1)[1]: v for k, v in terms.items() if k.startswith(spec.name + ".")}
                method.after_step(ctx()[spec.name], state, own)
        cache.flush()
        return CacheReport(cache.stats.batches_served, cache.stats.batches_computed, reasons[0] if reasons else None,
                           report_terms)


@dataclass
class TensorParallelReport:
    """What :func:`check_tensor_parallel` compared: the reference (TP=1) loss and terms per step,
    and the largest absolute difference seen over every rank for the loss, each term and each
    gradient (student parameters by name, the method's own as ``method.<name>``)."""

    loss: list[float]
    terms: list[dict[str, float]]
    max_diff: dict[str, float]


def _tp_worker(dirs: Mapping[str, str], name: str | tuple[MethodSpec, Any], config: Mapping[str, Any] | None,
               task: str, family: Family, seed: int, steps: int) -> dict[str, Any]:
    """One rank of :func:`check_tensor_parallel`: the method's steps on the saved tiny models.
    ``name`` is a registered name, or a spec without its factory plus a reference to the factory
    (a class in a test module does not unpickle in a fresh process)."""
    from gkd import parallel
    from gkd.models import from_pretrained
    from gkd.parallel.launch import _resolve

    if not isinstance(name, str):
        bare, factory = name
        name = dataclasses.replace(bare, factory=_resolve(factory))

    models: dict[str, nn.Module] = {key: from_pretrained(d, frozen=key != STUDENT) for key, d in dirs.items()}
    models[STUDENT].train()
    method, state = build_method(name, config, models=models, task=task, seed=seed,
                                 tensor_parallel=parallel.tp_world_size(), with_state=True)
    sel = selected(method, state=state)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"loss": [], "terms": [], "grads": []}
    for i in range(steps):
        for p in [*models[STUDENT].parameters(), *method.parameters()]:
            p.grad = None
        result = run_step(sel, models, tiny_batch(family, task, generator=g), iteration=i, total=steps, seed=seed,
                          setup=i == 0, after_step=True)
        result.loss.backward()
        grads = full_gradients(models[STUDENT])
        grads |= {f"method.{n}": p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        out["loss"].append(float(result.loss.detach()))
        out["terms"].append({k: float(v.detach()) for k, v in result.terms.items()})
        out["grads"].append(grads)
    return out


def check_tensor_parallel(name: str | MethodSpec, config: Mapping[str, Any] | None = None, *,
                          family: Family = "encoder", task: str | None = None, tensor_parallel: int = 2,
                          teachers: Sequence[str] | Mapping[str, int] | None = None, student_layers: int = 2,
                          teacher_layers: int = 4, steps: int = 2, seed: int = 0,
                          tolerance: float = 1e-5) -> TensorParallelReport:
    """Check that a method gives the same loss, terms and gradients under tensor parallelism as
    on one process: the same tiny models and batches at TP=1 and at TP=``tensor_parallel``
    (``tensor_parallel`` local gloo processes, megatron-core's TP groups, the engine's
    ``distill_step``), every rank compared with the reference.

    This is what the engine's own TP tests check for the built-in methods; use it in a plugin's
    tests when the method reads sharded features (attention scores, Q/K/V, FFN activations,
    vocabulary-sharded logits) or owns parameters. Takes a few seconds (process start-up).

    Args:
        name: A registered method name (workers load installed plugins afresh), or a
            :class:`MethodSpec` whose factory is a module-level class or function.
        config, family, task, teachers, student_layers, teacher_layers, seed: As for
            :func:`check_conformance` (the method's parameters are initialised from ``seed`` on
            every rank, so replicated parameters start equal).
        tensor_parallel: The TP size to compare with TP=1; it must divide the tiny models'
            heads (4; decoders have 2 key/value heads) and FFN width (64).
        steps: Steps run, each on its own batch, with the method's state carried over.
        tolerance: Largest absolute difference allowed (float32 reductions differ in order).

    Returns:
        The :class:`TensorParallelReport`.

    Raises:
        AssertionError: A loss, term or gradient differs by more than ``tolerance``, or a term
            or gradient exists at one TP size only; the message names it and the difference.
    """
    import tempfile
    from pathlib import Path

    from gkd import parallel
    from gkd.models import build_model, export_hf
    from gkd.parallel.launch import _reference

    spec = _spec(name)
    task = task or default_task(family)
    if teachers is None:
        teachers = ({"t1": teacher_layers, "t2": max(student_layers, teacher_layers - 1)}
                    if spec.kind == "multi-teacher" else {"t": teacher_layers})
    depths = dict(teachers) if isinstance(teachers, Mapping) else dict.fromkeys(teachers, teacher_layers)
    with tempfile.TemporaryDirectory(prefix="gkd-tp-check-") as root:
        dirs = {STUDENT: str(Path(root) / STUDENT)}
        export_hf(build_model(tiny_config(family, student_layers, task=task), seed=seed), dirs[STUDENT])
        for k, (teacher, layers) in enumerate(depths.items()):
            dirs[teacher_key(teacher)] = str(Path(root) / f"teacher-{teacher}")
            export_hf(build_model(tiny_config(family, layers, task=task), seed=seed + 1 + k),
                      dirs[teacher_key(teacher)])
        method = name if isinstance(name, str) else (dataclasses.replace(spec, factory=None), _reference(spec.factory))
        call = (dirs, method, config, task, family, seed, steps)
        (ref,) = parallel.run_distributed(_tp_worker, 1, *call)
        ranks = parallel.run_distributed(_tp_worker, tensor_parallel, *call)
    worst: dict[str, float] = {}

    def compare(what: str, want: float | torch.Tensor, got: float | torch.Tensor, rank: int, i: int) -> None:
        diff = float((torch.as_tensor(got) - torch.as_tensor(want)).abs().max())
        worst[what] = max(worst.get(what, 0.0), diff)
        if not diff <= tolerance:
            raise AssertionError(f"{spec.name}: step {i}, {what} differs at TP={tensor_parallel} (rank {rank}) from "
                                 f"TP=1 by {diff:.3g} > {tolerance:g}")

    for rank, got in enumerate(ranks):
        for i in range(steps):
            compare("loss", ref["loss"][i], got["loss"][i], rank, i)
            for kind in ("terms", "grads"):
                missing = ref[kind][i].keys() ^ got[kind][i].keys()
                if missing:
                    raise AssertionError(f"{spec.name}: step {i}, {kind} present at one TP size only: {sorted(missing)}")
                for key, want in ref[kind][i].items():
                    compare(key if kind == "terms" else f"grad {key}", want, got[kind][i][key], rank, i)
    return TensorParallelReport(ref["loss"], ref["terms"], worst)


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient of a gkd model in its TP=1 layout (shards gathered, vocabulary padding
    dropped), for tests that compare a step at TP=k with TP=1. Collective under tensor
    parallelism; parameters without a gradient are left out."""
    from gkd import parallel
    from gkd.models.sharding import ShardKind, gather_full, shard_kind

    group, tp, cfg = parallel.tp_group(), parallel.tp_world_size(), model.model_config  # type: ignore[attr-defined]
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        kind = shard_kind(name, cfg)
        full = gather_full(p.grad, kind, group, tp)
        grads[name] = (full[: cfg.vocab_size] if kind is ShardKind.VOCAB else full).clone()
    return grads


__all__ = [
    "HEAD_FOR_TASK",
    "MASK_ID",
    "TINY_DECODER_KV_HEADS",
    "TINY_FFN",
    "TINY_HEADS",
    "TINY_HIDDEN",
    "TINY_LABELS",
    "TINY_VOCAB",
    "CacheReport",
    "Conformance",
    "TensorParallelReport",
    "build_method",
    "check_cache",
    "check_conformance",
    "check_tensor_parallel",
    "context_of",
    "default_task",
    "full_gradients",
    "outputs",
    "run_step",
    "selected",
    "shape",
    "step",
    "tiny_batch",
    "tiny_config",
    "tiny_models",
    "validate_config",
]
