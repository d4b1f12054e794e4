"""Static checks of a method against the models' shapes, before any model is built.

Config validation (``gkd validate``, and the start of ``gkd run``) calls :func:`check_features`
for every method entry of every stage, with a :class:`~gkd.methods.api.MethodContext` built
from the checkpoints' ``config.json``. It reports a problem the user can fix as a
:class:`FeatureIssue` instead of a failure minutes into the run.

Feature patterns (the grammar of :class:`~gkd.methods.spec.FeatureUse`):

* ``embeddings``, ``logits``, ``logits.vocab_shard`` (LM / MLM heads), ``pooled`` (encoders with a
  pooler), ``final_norm`` (decoders);
* ``layers.{i}.<role>`` — ``{i}`` is "layers the method chooses";
* ``layers.<n>.<role>`` — one literal layer (0-based);

with ``<role>`` one of :data:`gkd.models.taps.LAYER_ROLES` (``input``, ``output``,
``attention.query`` / ``key`` / ``value`` / ``scores`` / ``probs`` / ``context``,
``ffn.intermediate``).

This module imports torch (through :mod:`gkd.models.taps`) but never megatron-core.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gkd.models.taps import LAYER_ROLES

if TYPE_CHECKING:
    from gkd.methods.api import MethodContext, ModelShape
    from gkd.methods.spec import FeatureUse, MethodSpec

MODEL_TAPS: tuple[str, ...] = ("embeddings", "logits", "logits.vocab_shard", "pooled", "final_norm")
"""Tap names outside the layer stack."""

_LAYER_RE = re.compile(r"^layers\.(\{i\}|0|[1-9][0-9]*)\.(.+)$")


@dataclass(frozen=True)
class FeatureIssue:
    """One problem of a method with the models it is given.

    Attributes:
        model: The model concerned: ``"student"`` or ``"teacher 'NAME'"``.
        field: The key of the method's ``config`` that causes it (validation reports the issue
            at ``stages[i].methods[j].config.<field>``), or ``None`` when no config key does
            (reported at ``stages[i].methods[j].name``).
        message: One line naming the method, the model, the values and the fix.
    """

    model: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return self.message


def model_label(key_or_name: str | None) -> str:
    """``"student"`` for the student, ``"teacher 'NAME'"`` for a teacher name (or ``teacher:NAME`` key)."""
    if key_or_name is None or key_or_name == "student":
        return "student"
    name = key_or_name.split(":", 1)[1] if key_or_name.startswith("teacher:") else key_or_name
    return f"teacher '{name}'"


def parse_pattern(pattern: str) -> tuple[str | int | None, str] | None:
    """``(layer, name)`` of a feature pattern, or ``None`` when it is not one.

    ``layer`` is ``None`` for a model-level tap (``name`` is the tap), ``"{i}"`` for a
    method-chosen layer and an ``int`` for a literal layer (``name`` is the role).
    """
    if pattern in MODEL_TAPS:
        return None, pattern
    m = _LAYER_RE.match(pattern)
    if m is None or m.group(2) not in LAYER_ROLES:
        return None
    layer = m.group(1)
    return (layer if layer == "{i}" else int(layer)), m.group(2)


def _pattern_problem(pattern: object) -> str | None:
    if not isinstance(pattern, str):
        return f"{pattern!r} is not a string"
    if parse_pattern(pattern) is not None:
        return None
    m = re.match(r"^layers\.([^.]+)\.(.+)$", pattern)
    if m is not None and m.group(2) in LAYER_ROLES:
        return f"'{pattern}': the layer must be {{i}} or a layer number, not '{m.group(1)}'"
    if m is not None:
        hint = difflib.get_close_matches(m.group(2), LAYER_ROLES, n=1)
        extra = f"; did you mean 'layers.{m.group(1)}.{hint[0]}'?" if hint else f"; roles: {', '.join(LAYER_ROLES)}"
        return f"'{pattern}': unknown layer role '{m.group(2)}'{extra}"
    candidates = [*MODEL_TAPS, "layers.{i}.output"]
    hint = difflib.get_close_matches(pattern, candidates, n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else ""
    return (f"'{pattern}' is not a tap pattern{extra} (use {', '.join(MODEL_TAPS)} or "
            f"layers.{{i}}.<role> with <role> in {', '.join(LAYER_ROLES)})")


def validate_feature_patterns(features: FeatureUse) -> list[str]:
    """Grammar errors of a spec's :class:`~gkd.methods.spec.FeatureUse`, one message each
    (empty: all patterns are valid). Registration can reject a spec with any."""
    problems: list[str] = []
    for side in ("teacher", "student"):
        patterns = getattr(features, side)
        if isinstance(patterns, str) or not isinstance(patterns, Iterable):
            problems.append(f"{side} features must be a tuple of tap patterns, got {type(patterns).__name__}")
            continue
        for pattern in patterns:
            problem = _pattern_problem(pattern)
            if problem is not None:
                problems.append(f"{side} feature {problem}")
    return problems


def matches(pattern: str, tap: str) -> bool:
    """Whether the tap name ``tap`` (e.g. ``layers.3.output``) is covered by ``pattern``."""
    parsed, other = parse_pattern(pattern), _parse_tap(tap)
    if parsed is None or other is None:
        return pattern == tap
    (layer, name), (tap_layer, tap_name) = parsed, other
    if name != tap_name:
        return False
    if layer is None or tap_layer is None:
        return layer is None and tap_layer is None
    return layer == "{i}" or layer == tap_layer


def _parse_tap(tap: str) -> tuple[int | None, str] | None:
    parsed = parse_pattern(tap)
    if parsed is None or parsed[0] == "{i}":
        return None
    layer, name = parsed
    return (layer if isinstance(layer, int) else None), name


def _model_tap_problem(name: str, shape: ModelShape, model: str) -> str | None:
    """Why a model-level tap can never exist on ``shape`` (``None``: it can)."""
    if name == "final_norm" and shape.family != "decoder":
        return f"which only decoders have, but the {model} is an {shape.family}"
    if name == "pooled":
        if shape.family != "encoder":
            return f"which only encoders with a pooler have, but the {model} is a {shape.family}"
        if shape.has_pooler is False:
            return f"but the {model} is an encoder without a pooler (add_pooler: false)"
    return None


def pattern_issues(method: str, patterns: Iterable[str], shape: ModelShape, model: str) -> list[FeatureIssue]:
    """Issues of tap patterns against one model: taps its family (or architecture) cannot
    produce, and literal layer indices out of range. ``logits`` is not checked here: whether a
    method reads them often depends on its config; the method's :meth:`Method.check` does."""
    issues: list[FeatureIssue] = []
    for pattern in patterns:
        parsed = parse_pattern(pattern)
        if parsed is None:
            issues.append(FeatureIssue(model, None, f"{method}: declares the feature {_pattern_problem(pattern)}"))
            continue
        layer, name = parsed
        if layer is None:
            problem = _model_tap_problem(name, shape, model)
            if problem is not None:
                issues.append(FeatureIssue(model, None, f"{method} reads '{name}', {problem}"))
        elif isinstance(layer, int) and layer >= shape.num_layers:
            issues.append(FeatureIssue(
                model, None, f"{method} reads '{pattern}', but the {model} has {shape.num_layers} layers "
                             f"(layers.0 to layers.{shape.num_layers - 1})"))
    return issues


def _logit_width(shape: ModelShape, task: str) -> int | None:
    if task == "sequence_classification" or shape.head == "classification":
        return shape.num_labels
    if task in ("masked_lm", "causal_lm") or shape.head in ("lm", "mlm"):
        return shape.vocab_size
    return None


def logits_issues(method: str, context: MethodContext, *, field: str | None = None, fix: str = "",
                  teachers: Iterable[str] | None = None) -> list[FeatureIssue]:
    """For :meth:`Method.check` of a method that compares logits: every model it reads must
    have a task head, and the teachers' logits must be as wide as the student's (classes, or
    vocabulary for token-level tasks). Unknown heads (``ModelShape.head is None``) pass.

    Args:
        method: The method's name, for the messages.
        context: The method's context.
        field: The config key that makes the method read logits (``None``: always).
        fix: Appended to the "no head" message, e.g. ``"or set soft_weight: 0"``.
        teachers: The teachers whose logits are read (default: all of ``context.teachers``).
    """
    issues: list[FeatureIssue] = []
    names = list(context.teachers) if teachers is None else list(teachers)
    if context.student.has_logits is False:
        issues.append(FeatureIssue("student", field, f"{method}: the student has no task head, so it gives no logits; "
                                                     "give it the task's head" + (f" {fix}" if fix else "")))
    width = _logit_width(context.student, context.task)
    for name in names:
        shape, label = context.teachers[name], model_label(name)
        if shape.has_logits is False:
            issues.append(FeatureIssue(label, field, f"{method}: {label} has no task head, so it gives no logits; "
                                                     f"fine-tune it first (a stage with 'train: teacher:{name}')"
                                                     + (f" {fix}" if fix else "")))
            continue
        other = _logit_width(shape, context.task)
        if width and other and other != width:  # 0 or None: unknown
            what = "classes" if context.task == "sequence_classification" else "vocabulary entries"
            issues.append(FeatureIssue(label, field, f"{method}: compares logits of equal width, but the student has "
                                                     f"{width} {what} and {label} {other}"))
    return issues


def check_features(spec: MethodSpec, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
    """Every problem of ``spec`` with the models of ``context``, before any model is built.

    1. each feature pattern of ``spec.features`` names a tap that the model's family and
       architecture produce (``spec.features.student`` against ``context.student``,
       ``spec.features.teacher`` against every teacher of ``context.teachers``);
    2. a literal layer index (``layers.5.output``) is below the model's ``num_layers``;
    3. the method's own rules: ``spec.factory.check(config, context)`` (see
       :meth:`gkd.methods.api.Method.check`) when the factory has a ``check``.

    Args:
        spec: The registered method.
        config: The method's config, valid against ``spec.config_schema``; missing defaults
            are filled in from the schema before the method's ``check`` sees it.
        context: Shapes of the student and of the teachers this method reads (names in config
            order), the task, the stage kind and the tensor-parallel size.

    Returns:
        The issues, in the order above; empty when everything fits.
    """
    from gkd.config.schema import apply_defaults

    issues: list[FeatureIssue] = []
    issues += pattern_issues(spec.name, spec.features.student, context.student, "student")
    for name, shape in context.teachers.items():
        issues += pattern_issues(spec.name, spec.features.teacher, shape, model_label(name))
    check: Callable[..., Any] | None = getattr(spec.factory, "check", None)
    if callable(check):
        full = apply_defaults(spec.config_schema, dict(config))
        issues += list(check(full, context))
    return issues


def depth_issues(method: str, context: MethodContext, *, mapping: str = "maps every student layer onto a teacher layer",
                 field: str | None = None, fix: str = "", teachers: Iterable[str] | None = None) -> list[FeatureIssue]:
    """For :meth:`Method.check` of a method that pairs every student layer with teacher layers:
    each teacher must be at least as deep as the student.

    Args:
        method: The method's name, for the messages.
        context: The method's context.
        mapping: What the method does with the layers, as the message says it.
        field: The config key that makes the method pair layers (``None``: always).
        fix: Appended to the message, e.g. ``", or set alpha: 0"``.
        teachers: The teachers to check (default: all of ``context.teachers``).
    """
    s = context.student
    issues = []
    for name in list(context.teachers) if teachers is None else list(teachers):
        t, label = context.teachers[name], model_label(name)
        if t.num_layers < s.num_layers:
            issues.append(FeatureIssue(label, field, f"{method}: {mapping}, but the student has {s.num_layers} layers "
                                                     f"and {label} {t.num_layers}; use a teacher at least as deep as "
                                                     f"the student{fix}"))
    return issues


__all__ = [
    "MODEL_TAPS",
    "FeatureIssue",
    "check_features",
    "depth_issues",
    "logits_issues",
    "matches",
    "model_label",
    "parse_pattern",
    "pattern_issues",
    "validate_feature_patterns",
]
