"""TMKD (Yang et al., 2020): distil from several teachers at once by averaging their soft losses."""

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
    logits_issues,
    losses,
    teacher_key,
    teacher_logits,
)


class TMKD(Method):
    name = "tmkd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        return logits_issues(cls.name, context)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest()}
        models.update({teacher_key(t): ForwardRequest() for t in self.context.teacher_names})
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_logits = outputs.student.logits
        mask = losses.logits_mask(s_logits, outputs.batch.get("attention_mask"))
        per_teacher = torch.stack([
            losses.soft_loss(cfg["soft_loss"], s_logits, teacher_logits(outputs, t, self.name), cfg["temperature"], mask)
            for t in self.context.teacher_names
        ])
        combined = per_teacher.mean() if cfg["reduction"] == "mean" else per_teacher.sum()
        terms = {"soft": cfg["soft_weight"] * combined}
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms
