"""Decisions about a run config that validation and the typed build must make identically.

Both :mod:`gkd.config.validate` (over the raw, possibly invalid mapping) and
:mod:`gkd.config.build` (over the validated one) call these, so "which teachers does this
stage use" or "what shape does the student have" has exactly one answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENCODER_TYPES = frozenset({"bert", "mobilebert"})
DECODER_TYPES = frozenset({"llama"})
"""Hugging Face ``model_type`` values gkd's models read (kept here so that checking a config
does not import megatron-core)."""

HEAD_FOR_TASK = {"sequence_classification": "classification", "masked_lm": "mlm", "causal_lm": "lm"}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def defined_teachers(raw: Mapping[str, Any]) -> list[str]:
    """Names in ``teachers``, in config order (malformed entries skipped)."""
    return [t["name"] for t in _list(raw.get("teachers")) if isinstance(t, dict) and isinstance(t.get("name"), str)]


@dataclass(frozen=True)
class StageView:
    """A stage as the resolver sees it: its index, raw mapping and the teachers available to it."""

    index: int
    raw: Mapping[str, Any]
    available: tuple[str, ...]
    """Teachers defined in ``teachers`` plus those published by earlier stages, in that order."""
    published_before: frozenset[str]

    @property
    def teachers(self) -> list[str]:
        """The stage's teachers: its ``teachers`` list, or every available teacher."""
        given = self.raw.get("teachers")
        if isinstance(given, list):
            return [t for t in given if isinstance(t, str)]
        return list(self.available)


def stages(raw: Mapping[str, Any]) -> Iterator[StageView]:
    """Every stage in order, with the teachers it may use (``publish_as_teacher`` adds one)."""
    available = defined_teachers(raw)
    published: set[str] = set()
    for index, stage in enumerate(_list(raw.get("stages"))):
        if not isinstance(stage, dict):
            continue
        yield StageView(index, stage, tuple(available), frozenset(published))
        pub = stage.get("publish_as_teacher")
        if isinstance(pub, str) and pub not in available:
            available.append(pub)
            published.add(pub)


def method_teachers(entry: Mapping[str, Any], stage_teachers: Sequence[str], kind: str | None = None,
                    *, stage_lists: bool = True) -> list[str]:
    """A method's teachers: its own ``teachers`` list, or the stage's.

    A ``teacher-assistant`` method (``kind``, e.g. TAKD) in a stage that lists no teachers
    (``stage_lists`` false: ``stage_teachers`` is every available teacher) reads the last of
    them, the previous link of the chain: the teacher published last before the stage, or the
    last configured one.
    """
    given = entry.get("teachers")
    if isinstance(given, list):
        return [t for t in given if isinstance(t, str)]
    if kind == "teacher-assistant" and not stage_lists and stage_teachers:
        return [stage_teachers[-1]]
    return list(stage_teachers)


def merged_section(top: Mapping[str, Any], user_stage: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A stage's ``optimizer``/``schedule``/``training``: the top-level (defaulted) section with
    the keys the stage sets itself on top (so a partial stage block keeps the other values)."""
    own = user_stage.get(key)
    return {**dict(top.get(key) or {}), **(own if isinstance(own, dict) else {})}


def family_of(model_type: str) -> str | None:
    """``encoder`` / ``decoder`` for a supported Hugging Face ``model_type``, else None."""
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in DECODER_TYPES:
        return "decoder"
    return None


__all__ = ["DECODER_TYPES", "ENCODER_TYPES", "HEAD_FOR_TASK", "StageView", "defined_teachers", "family_of",
           "merged_section", "method_teachers", "stages"]
