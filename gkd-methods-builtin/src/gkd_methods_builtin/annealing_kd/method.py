"""Annealing-KD (Jafari et al., 2021), phase 1: the student's logits regress onto the teacher's
logits scaled by an annealing factor φ that grows from 1/τ_max to 1 over the stage."""

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
    raise_issues,
    teacher_key,
    teacher_logits,
)


def annealing_temperature(step: StepContext, max_temperature: int, anneal_by: str = "iteration") -> int:
    """The annealing temperature T ∈ {1, …, τ_max} of this step.

    ``iteration``: ``T = max(1, ⌈(1 − progress)·τ_max⌉)`` with ``progress = iteration / N``
    (computed in integers, so no rounding puts T one step off at a boundary); ``epoch``:
    ``T = max(1, τ_max − epoch)`` (0-based epochs).
    """
    if anneal_by == "epoch":
        return max(1, max_temperature - step.epoch)
    total = max(1, step.total_iterations)
    remaining = max(0, total - step.iteration)
    return max(1, -(-remaining * max_temperature // total))  # ceil((N − i)·τ_max / N)


def annealing_factor(step: StepContext, max_temperature: int, anneal_by: str = "iteration") -> float:
    """φ(T) = 1 − (T − 1)/τ_max: 1/τ_max at the start, 1 once T reaches 1."""
    return 1.0 - (annealing_temperature(step, max_temperature, anneal_by) - 1) / max_temperature


class AnnealingKD(Method):
    name = "annealing-kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Logits on the student and the teacher, of equal width."""
        return logits_issues(cls.name, context)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))

    def phi(self, step: StepContext) -> float:
        return annealing_factor(step, self.config["max_temperature"], self.config["anneal_by"])

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        return PassPlan({STUDENT: ForwardRequest(), teacher_key(self.teacher_name): ForwardRequest()})  # logits only

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        student = outputs.student
        z, zt = student.logits, teacher_logits(outputs, self.teacher_name, self.name)
        mask = losses.logits_mask(z, outputs.batch.get("attention_mask"))
        terms = {"annealing": losses.mse(z.float(), self.phi(step) * zt.float(), mask)}
        if self.config["hard_weight"] > 0 and student.task_loss is not None:
            terms["hard"] = self.config["hard_weight"] * student.task_loss
        return terms
