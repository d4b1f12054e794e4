"""hidden-cos: pull the student's last hidden state towards a teacher hidden state (cosine distance)."""

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
    hidden_tap,
    losses,
    raise_issues,
    teacher_key,
)


class HiddenCos(Method):
    name = "hidden-cos"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Shape rules only this method knows; validation runs them before any model is built."""
        issues = []
        for name, t in context.teachers.items():
            if config["teacher_layer"] > t.num_layers:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", "teacher_layer",
                    f"hidden-cos: teacher_layer is {config['teacher_layer']}, but teacher '{name}' has "
                    f"{t.num_layers} layers; use 1 to {t.num_layers}, or 0 for the last"))
        return issues

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))  # the same rules, for a direct build
        s, t = context.student, self.teacher_shape  # the one teacher: self.teacher_name
        # A trainable attribute: it joins the auxiliary model, the optimizer and checkpoints.
        self.proj = nn.Linear(s.hidden_size, t.hidden_size, bias=False)
        self.student_tap = hidden_tap(s.num_layers)                                 # "layers.{S-1}.output"
        self.teacher_tap = hidden_tap(self.config["teacher_layer"] or t.num_layers)  # "layers.{k-1}.output"

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int,
             previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None  # one forward pass per step
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset({self.student_tap})),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset({self.teacher_tap})),
        })

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int,
             outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        student = self.proj(outputs.student.features[self.student_tap])
        teacher = outputs.teacher(self.teacher_name).features[self.teacher_tap]
        ramp = min(1.0, step.progress / cfg["warmup"]) if cfg["warmup"] > 0 else 1.0
        terms = {"cos": ramp * cfg["cos_weight"]
                 * losses.cosine_distance(student, teacher, outputs.batch["attention_mask"])}
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms
