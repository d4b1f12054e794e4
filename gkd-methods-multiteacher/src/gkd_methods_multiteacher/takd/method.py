"""TAKD (Mirzadeh et al., 2020): one link of a teacher-assistant chain.

The stage's student learns from its single teacher, the previous link of the chain (the
original teacher, or an assistant an earlier stage published with ``publish_as_teacher``):
``(1−λ)·hard + λ·τ²·KL(teacher‖student)`` at temperature τ. The chain itself is a sequence of
stages; the trainer hands each link's result to the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gkd.methods import (
    STUDENT,
    FeatureIssue,
    ForwardRequest,
    Method,
    MethodContext,
    PassPlan,
    PassView,
    StepContext,
    hard_loss_claim,
    prediction_issues,
    prediction_terms,
    raise_issues,
    teacher_key,
)


class TAKD(Method):
    name = "takd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        issues: list[FeatureIssue] = []
        if len(context.teachers) != 1:
            names = ", ".join(context.teacher_names) or "none"
            issues.append(FeatureIssue("student", None, f"{cls.name}: a link of a teacher-assistant chain distils from "
                                                        f"one teacher, the previous link; it was given "
                                                        f"{len(context.teachers)} ({names}): list that one in the "
                                                        "entry's or the stage's 'teachers'"))
            return issues
        return prediction_issues(cls.name, config, context, fix="or set soft_weight: 0 (hard loss only)")

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(type(self).check(self.config, context))

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        return PassPlan({STUDENT: ForwardRequest(), teacher_key(self.teacher_name): ForwardRequest()})

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        return prediction_terms(self.name, self.config, outputs, self.teacher_name)
