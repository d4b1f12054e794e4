"""A distillation method described as data.

A :class:`MethodSpec` is what a plugin hands to ``register`` in ``gkd_register_methods``.
It is everything gkd needs to list, document and validate a method *before* any model
exists: its name, citation, the kind of run it belongs to, the features it reads, whether
it changes the forward pass or owns parameters, and the JSON Schema of its ``config``.
The runtime behaviour (hook plans and losses) lives in the class named by ``factory``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MethodKind = Literal["single-teacher", "multi-teacher", "teacher-assistant"]
"""``single-teacher``: one teacher per loss; ``multi-teacher``: combines several teachers'
losses (TMKD, MT-BERT, RL-KD, Uncertainty, DGKD); ``teacher-assistant``: chains stages in
which an earlier student teaches a later one (TAKD)."""

StageKind = Literal["pretrain", "task"]
"""``pretrain``: task-agnostic distillation on unlabelled text (MLM / causal LM);
``task``: task-specific distillation with labels."""

METHOD_KINDS: tuple[str, ...] = ("single-teacher", "multi-teacher", "teacher-assistant")
STAGE_KINDS: tuple[str, ...] = ("pretrain", "task")


@dataclass(frozen=True)
class FeatureUse:
    """The features a method may read, as tap-name patterns.

    Patterns use the names of :mod:`gkd.models.taps`, with ``{i}`` standing for "some layer
    chosen by the method's layer mapping", e.g. ``layers.{i}.output`` or
    ``layers.{i}.attention.scores``. This is documentation and a static check; the exact
    features of an iteration come from the method's hook plan.
    """

    teacher: tuple[str, ...] = ()
    student: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodSpec:
    """Static description of one distillation method.

    Args:
        name: Unique, lower-case name used in run configs (``stages[].methods[].name``).
        summary: One line shown by ``gkd methods list``.
        citation: Paper reference, e.g. ``"Hinton et al., 2015. Distilling the Knowledge in a Neural Network."``
        kind: See :data:`MethodKind`.
        stages: Stage kinds the method applies to (:data:`StageKind`).
        features: Features read from teacher(s) and student.
        modifies_forward: True when the method attaches operation hooks (Theseus, DIITO, LRC-BERT).
        has_parameters: True when the method owns trainable parameters (TinyBERT's ``W_h``).
        config_schema: JSON Schema (Draft 2020-12) of the method's ``config`` mapping, with
            ``default`` on every optional property. Checked when the method registers.
        factory: Builds the runtime method object (a :class:`gkd.methods.api.Method`)
            from the validated config; ``None`` only for methods that are pure data.
        notes: Free text for ``gkd methods show`` (deviations from the paper, fixed bugs).
    """

    name: str
    summary: str
    citation: str
    kind: MethodKind
    stages: tuple[StageKind, ...]
    features: FeatureUse = field(default_factory=FeatureUse)
    modifies_forward: bool = False
    has_parameters: bool = False
    config_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    factory: Callable[..., Any] | None = None
    notes: str = ""

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (used by ``gkd methods show --json``)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "citation": self.citation,
            "kind": self.kind,
            "stages": list(self.stages),
            "features": {"teacher": list(self.features.teacher), "student": list(self.features.student)},
            "modifies_forward": self.modifies_forward,
            "has_parameters": self.has_parameters,
            "config_schema": dict(self.config_schema),
            "notes": self.notes,
        }


def load_schema(package: str, name: str = "schema.json") -> dict[str, Any]:
    """The JSON Schema shipped next to a method module: ``load_schema(__name__)``."""
    import json
    from importlib import resources

    return dict(json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8")))
