"""ALP-KD (Passban et al., 2021): every student layer imitates an attention-weighted combination
of all teacher layers, plus the soft and hard prediction losses."""

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
    hidden_tap,
    losses,
    prediction_issues,
    prediction_terms,
    raise_issues,
    teacher_key,
)
from gkd_methods_builtin._feature_kd import (
    attend_over_layers,
    pool,
)


class ALPKD(Method):
    """``L = β·H + η·L_soft + λ·Σ_i MSE(h_S^i, c_i)``, ``c_i = Σ_j softmax_j(h_S^i·h_T^j)·h_T^j``.

    ``i`` runs over the student's hidden states 1..S and ``j`` over all the teacher's 1..T
    (layer outputs; the embeddings are not used).
    """

    name = "alp-kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Equal hidden sizes for the ALP term (it has no projection); teacher logits for the soft term."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["alp_weight"] > 0:
            for name, t in context.teachers.items():
                if t.hidden_size != s.hidden_size:
                    issues.append(FeatureIssue(
                        f"teacher '{name}'", "alp_weight",
                        f"alp-kd: compares student and teacher hidden states without a projection, so it needs "
                        f"equal hidden sizes (student {s.hidden_size}, teacher '{name}' {t.hidden_size}); give the "
                        "student the teacher's width, use universal-kd (learned projections) or set alp_weight: 0"))
        return issues + prediction_issues(cls.name, config, context)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        on = self.config["alp_weight"] > 0
        self.student_taps = [hidden_tap(i) for i in range(1, context.student.num_layers + 1)] if on else []
        self.teacher_taps = [hidden_tap(j) for j in range(1, self.teacher_shape.num_layers + 1)] if on else []

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest(features=frozenset(self.student_taps))}
        if self.teacher_taps or self.config["soft_weight"] > 0:
            models[teacher_key(self.teacher_name)] = ForwardRequest(features=frozenset(self.teacher_taps))
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if self.student_taps:
            mask, how = outputs.batch["attention_mask"], cfg["pooling"]
            s_out, t_out = outputs.student, outputs.teacher(self.teacher_name)
            teacher = [pool(t_out.features[tap].float(), mask, how, self.teacher_shape.family) for tap in self.teacher_taps]
            alp = torch.zeros(())
            for tap in self.student_taps:
                s = pool(s_out.features[tap].float(), mask, how, self.context.student.family)
                alp = alp + losses.mse(s, attend_over_layers(s, teacher), mask if how == "tokens" else None)
            terms["alp"] = cfg["alp_weight"] * alp
        return terms | prediction_terms(self.name, cfg, outputs, self.teacher_name)
