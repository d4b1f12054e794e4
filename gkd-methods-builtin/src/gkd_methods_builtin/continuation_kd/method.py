"""Continuation-KD (Jafari et al., 2022): per example, a convex combination of the gold-label loss
and a margin-gated MSE towards the annealed teacher logits, moving from the smooth KD objective
to the task objective over the stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gkd.methods import (
    STUDENT,
    FeatureIssue,
    ForwardRequest,
    GkdError,
    Method,
    MethodContext,
    PassPlan,
    PassView,
    StepContext,
    hard_loss_claim,
    logits_issues,
    raise_issues,
    teacher_key,
    teacher_logits,
)
from gkd_methods_builtin.annealing_kd.method import annealing_factor


def continuation_weight(progress: float, denominator: float = 1.333, switch: float = 0.666) -> float:
    """ψ: ``progress / denominator``, and 1 once ``progress > switch``."""
    return 1.0 if progress > switch else progress / denominator


def per_example_mse(student: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[b]``: the mean squared error of each example's logits — over its classes (``[b, C]``),
    or over the vocabulary entries of its real tokens (``[b, s, V]``, padding excluded)."""
    sq = (student.float() - target.float()) ** 2
    if sq.dim() == 2:
        return sq.mean(-1)
    per_token = sq.mean(-1)  # [b, s]
    if attention_mask is None:
        return per_token.mean(-1)
    keep = attention_mask.to(per_token.dtype)
    return (per_token * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)


class ContinuationKD(Method):
    name = "continuation-kd"

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
        return annealing_factor(step, self.config["max_temperature"])

    def psi(self, step: StepContext) -> float:
        return continuation_weight(step.progress, self.config["psi_denominator"], self.config["psi_switch"])

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        return PassPlan({STUDENT: ForwardRequest(), teacher_key(self.teacher_name): ForwardRequest()})  # logits only

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        student = outputs.student
        z, zt = student.logits, teacher_logits(outputs, self.teacher_name, self.name)
        phi, psi = self.phi(step), self.psi(step)
        mse = per_example_mse(z, phi * zt.float(), outputs.batch.get("attention_mask") if z.dim() == 3 else None)
        gate = (mse.detach() > self.config["margin"] * phi).to(mse.dtype)  # easy examples drop out
        # mean_b(ψ·H_b + (1 − ψ)·MSE_b·gate_b), logged as its two parts
        terms = {"soft": (1.0 - psi) * (mse * gate).mean()}
        if self.config["hard_weight"] > 0:
            per_example = student.task_loss_per_example
            if per_example is None:
                raise GkdError(f"{self.name}: the batch has no labels, but the method's ψ·H part needs the gold labels; "
                               "use it in a stage with labels or set hard_weight: 0")
            terms["hard"] = self.config["hard_weight"] * psi * per_example.float().mean()
        return terms
