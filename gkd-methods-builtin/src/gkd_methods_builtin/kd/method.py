"""KD (Hinton et al., 2015): match the teacher's softened output distribution, plus the gold loss."""

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
    logits_issues,
    losses,
    teacher_key,
    teacher_logits,
)


class KD(Method):
    name = "kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        if config["soft_weight"] <= 0:
            return []
        return logits_issues(cls.name, context, field="soft_weight", fix="or set soft_weight: 0 (hard loss only)")

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return {"hard_loss": "hard_weight"} if config["hard_weight"] > 0 else {}

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        teacher = teacher_key(self.context.teacher_names[0])
        return PassPlan({STUDENT: ForwardRequest(), teacher: ForwardRequest()})

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if cfg["soft_weight"] > 0:
            s_logits = outputs.student.logits
            t_logits = teacher_logits(outputs, self.context.teacher_names[0], self.name)
            mask = losses.logits_mask(s_logits, outputs.batch.get("attention_mask"))
            terms["soft"] = cfg["soft_weight"] * losses.soft_loss(cfg["soft_loss"], s_logits, t_logits,
                                                                  cfg["temperature"], mask)
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms
