"""Universal-KD (Wu et al., 2021): intermediate layers of student and teacher, each mapped by its
own learned projection into a common output space, matched by attention-based layer projection
with a KL divergence, plus the soft and hard prediction losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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


class UniversalKD(Method):
    """``γ·Σ_i KL(softmax c_i ‖ softmax z_i)`` with ``z_i = P_S^i h_S^i``, ``ẑ_j = P_T^j h_T^j`` and
    ``c_i = Σ_j softmax_j(z_i·ẑ_j)·ẑ_j``, plus the soft and hard losses.

    ``P_S^i`` and ``P_T^j`` are bias-free linear maps into ``u`` dimensions, one per layer (the
    method's parameters, replicated on every tensor-parallel rank like the hidden states).
    """

    name = "universal-kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """With layers: intermediate, both models need an intermediate layer; teacher logits for the soft term."""
        issues: list[FeatureIssue] = []
        if config["universal_weight"] > 0 and config["layers"] == "intermediate":
            models = {"student": context.student} | {f"teacher '{n}'": t for n, t in context.teachers.items()}
            for label, shape in models.items():
                if shape.num_layers < 2:
                    issues.append(FeatureIssue(
                        label, "layers",
                        f"universal-kd: layers: intermediate reads hidden states 1 to L-1, but the {label} has "
                        f"{shape.num_layers} layer; set layers: all or use a deeper model"))
        return issues + prediction_issues(cls.name, config, context)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        s, t = context.student, self.teacher_shape
        last = 1 if self.config["layers"] == "all" else 0
        self.student_taps = [hidden_tap(i) for i in range(1, s.num_layers + last)]
        self.teacher_taps = [hidden_tap(j) for j in range(1, t.num_layers + last)]
        u = self.config["size"] or s.hidden_size
        self.student_proj = nn.ModuleList(nn.Linear(s.hidden_size, u, bias=False) for _ in self.student_taps)
        self.teacher_proj = nn.ModuleList(nn.Linear(t.hidden_size, u, bias=False) for _ in self.teacher_taps)

    @property
    def _active(self) -> bool:
        return self.config["universal_weight"] > 0

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        s_taps, t_taps = (self.student_taps, self.teacher_taps) if self._active else ([], [])
        models = {STUDENT: ForwardRequest(features=frozenset(s_taps))}
        if t_taps or self.config["soft_weight"] > 0:
            models[teacher_key(self.teacher_name)] = ForwardRequest(features=frozenset(t_taps))
        return PassPlan(models)

    def _project(self, proj: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, family: str) -> torch.Tensor:
        return proj(pool(hidden, mask, self.config["pooling"], family).to(proj.weight.dtype))

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if self._active:
            mask = outputs.batch["attention_mask"]
            s_out, t_out = outputs.student, outputs.teacher(self.teacher_name)
            teacher = [self._project(p, t_out.features[tap], mask, self.teacher_shape.family)
                       for p, tap in zip(self.teacher_proj, self.teacher_taps, strict=True)]
            total = torch.zeros(())
            for p, tap in zip(self.student_proj, self.student_taps, strict=True):
                z = self._project(p, s_out.features[tap], mask, self.context.student.family)
                total = total + losses.kl_divergence(z, attend_over_layers(z, teacher), scale_by_t2=False)
            terms["universal"] = cfg["universal_weight"] * total
        return terms | prediction_terms(self.name, cfg, outputs, self.teacher_name)
