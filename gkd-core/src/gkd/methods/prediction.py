"""KD's prediction-layer terms, for every method that adds them next to its own loss.

A method whose config has KD's fields — ``soft_weight``, ``soft_loss``, ``temperature`` and
``hard_weight`` — gets the same ``soft`` and ``hard`` terms, the same validation rules and the
same claim on the gold-label loss from these three functions (KD itself, ALP-KD, CKD,
Universal-KD, RAIL-KD, MGSKD).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gkd.methods import losses
from gkd.methods.api import MethodContext, PassView, teacher_logits
from gkd.methods.checks import FeatureIssue, logits_issues


def prediction_terms(method: str, config: Mapping[str, Any], outputs: PassView, teacher: str) -> dict[str, torch.Tensor]:
    """``soft`` (``soft_weight``·soft loss of the student's against ``teacher``'s logits at
    ``temperature``, padding excluded) and ``hard`` (``hard_weight``·the student's task loss);
    a term whose weight is 0 (or a hard term without labels) is left out."""
    terms: dict[str, torch.Tensor] = {}
    student = outputs.student
    if config["soft_weight"] > 0:
        t_logits = teacher_logits(outputs, teacher, method)
        mask = losses.logits_mask(student.logits, outputs.batch.get("attention_mask"))
        terms["soft"] = config["soft_weight"] * losses.soft_loss(config["soft_loss"], student.logits, t_logits,
                                                                 config["temperature"], mask)
    if config["hard_weight"] > 0 and student.task_loss is not None:
        terms["hard"] = config["hard_weight"] * student.task_loss
    return terms


def prediction_issues(method: str, config: Mapping[str, Any], context: MethodContext,
                      fix: str = "or set soft_weight: 0") -> list[FeatureIssue]:
    """The logits rules of the soft term (every teacher read has a head as wide as the
    student's), only when ``soft_weight > 0``."""
    if config["soft_weight"] <= 0:
        return []
    return logits_issues(method, context, field="soft_weight", fix=fix)


def hard_loss_claim(config: Mapping[str, Any]) -> dict[str, str]:
    """:meth:`Method.exclusive` of a method whose ``hard_weight`` adds the gold-label term."""
    return {"hard_loss": "hard_weight"} if config["hard_weight"] > 0 else {}


__all__ = ["hard_loss_claim", "prediction_issues", "prediction_terms"]
