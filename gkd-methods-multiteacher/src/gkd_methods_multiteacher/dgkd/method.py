"""DGKD (Son et al., 2021): densely guided distillation at the end of a teacher-assistant chain.

Every earlier teacher and assistant guides the student. In each step every teacher is dropped at
random (stochastic DGKD); only the survivors are put in the plan, so the engine does not run the
dropped ones. Loss: ``λ·Σ_survivors soft_i + (1−λ)·hard`` (only the hard term when none survives).
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
    losses,
    prediction_issues,
    raise_issues,
    teacher_key,
    teacher_logits,
)


class DGKD(Method):
    name = "dgkd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        issues = list(prediction_issues(cls.name, config, context, fix="or leave it out of this entry's teachers"))
        n = len(context.teachers)
        if config["drop"] == "count" and config["drop_count"] >= n:
            issues.append(FeatureIssue("student", "drop_count", f"{cls.name}: drop_count {config['drop_count']} drops "
                                                                f"every one of the {n} teachers in every step; use at "
                                                                f"most {n - 1}"))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(type(self).check(self.config, context))

    def survivors(self, step: StepContext) -> list[str]:
        """The teachers that guide the student in this forward, drawn with ``step.generator``."""
        names = self.context.teacher_names
        if self.config["drop"] == "count":
            dropped = set(torch.randperm(len(names), generator=step.generator)[: self.config["drop_count"]].tolist())
            return [t for i, t in enumerate(names) if i not in dropped]
        keep = torch.rand(len(names), generator=step.generator) < self.config["survival"]
        return [t for t, kept in zip(names, keep.tolist(), strict=True) if kept]

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest()}
        models.update({teacher_key(t): ForwardRequest() for t in self.survivors(step)})
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        student = outputs.student
        survived = [t for t in self.context.teacher_names if teacher_key(t) in outputs.models]
        if survived:
            mask = losses.logits_mask(student.logits, outputs.batch.get("attention_mask"))
            per_teacher = torch.stack([
                losses.soft_loss(cfg["soft_loss"], student.logits, teacher_logits(outputs, t, self.name),
                                 cfg["temperature"], mask)
                for t in survived
            ])
            combined = per_teacher.sum() if cfg["reduction"] == "sum" else per_teacher.mean()
        else:  # nobody guides this step: a zero soft term (kept for a steady log) and the hard loss
            combined = student.logits.sum() * 0.0
        terms = {"soft": cfg["soft_weight"] * combined}
        if cfg["hard_weight"] > 0 and student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * student.task_loss
        return terms
