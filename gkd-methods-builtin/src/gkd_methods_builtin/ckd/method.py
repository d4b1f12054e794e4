"""CKD (Park, Kim and Yang, 2021): contextual knowledge distillation through word relations and
layer-transforming relations, each distance- and angle-based, plus the soft and hard losses."""

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
    depth_issues,
    hard_loss_claim,
    hidden_tap,
    prediction_issues,
    prediction_terms,
    raise_issues,
    teacher_key,
    uniform_map,
)
from gkd_methods_builtin.ckd import relations

RELATIONS = ("wr_dist", "wr_angle", "ltr_dist", "ltr_angle")


class CKD(Method):
    """Relations of the student's hidden states 0..S against those of the teacher at the uniform
    map ``m[0..S]`` (embeddings, then contiguous teacher blocks; the last pair is both models'
    last hidden state)."""

    name = "ckd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher at least as deep as the student for the layer map; teacher logits for the soft term."""
        issues: list[FeatureIssue] = []
        if any(config[f"{r}_weight"] > 0 for r in RELATIONS):
            issues += depth_issues(cls.name, context)
        return issues + prediction_issues(cls.name, config, context)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        self.relations = [r for r in RELATIONS if self.config[f"{r}_weight"] > 0]
        s = context.student.num_layers
        if self.relations:
            self.student_taps = [hidden_tap(j) for j in range(s + 1)]
            self.teacher_taps = [hidden_tap(m) for m in uniform_map(self.teacher_shape.num_layers, s)]
        else:
            self.student_taps, self.teacher_taps = [], []

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
        if self.relations:
            keep = outputs.batch["attention_mask"].bool()
            s_feats, t_feats = outputs.student.features, outputs.teacher(self.teacher_name).features
            student = torch.stack([s_feats[tap] for tap in self.student_taps], dim=1)  # [b, S+1, s, h_s]
            teacher = torch.stack([t_feats[tap] for tap in self.teacher_taps], dim=1)  # [b, S+1, s, h_t]
            causal = self.context.student.family == "decoder"
            compute = {
                "wr_dist": lambda: relations.word_relation_distance(student, teacher, keep, causal),
                "wr_angle": lambda: relations.word_relation_angle(student, teacher, keep, cfg["window_size"], causal),
                "ltr_dist": lambda: relations.layer_relation_distance(student, teacher, keep),
                "ltr_angle": lambda: relations.layer_relation_angle(student, teacher, keep),
            }
            terms = {r: cfg[f"{r}_weight"] * compute[r]() for r in self.relations}
        return terms | prediction_terms(self.name, cfg, outputs, self.teacher_name)
