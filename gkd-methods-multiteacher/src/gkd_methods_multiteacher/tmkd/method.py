"""TMKD (Yang et al., 2020): distil from several teachers at once by averaging their soft losses."""

from __future__ import annotations

from typing import Any

import torch

from gkd.methods.api import STUDENT, ForwardRequest, Method, PassPlan, PassView, StepContext, teacher_key
from gkd_methods_builtin.kd.method import logits_mask, soft_loss, teacher_logits


class TMKD(Method):
    name = "tmkd"

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest()}
        models.update({teacher_key(t): ForwardRequest() for t in self.context.teacher_names})
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        mask = logits_mask(outputs)
        per_teacher = torch.stack([
            soft_loss(cfg["soft_loss"], outputs.student.logits, teacher_logits(outputs, t, self.name), cfg["temperature"], mask)
            for t in self.context.teacher_names
        ])
        combined = per_teacher.mean() if cfg["reduction"] == "mean" else per_teacher.sum()
        terms = {"soft": cfg["soft_weight"] * combined}
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms
