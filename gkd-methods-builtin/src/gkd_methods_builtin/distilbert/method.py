"""DistilBERT (Sanh et al., 2019): cosine distance between the last hidden states, τ²·KL on the
logits, and the hard (MLM or task) loss."""

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
    logits_issues,
    losses,
    raise_issues,
    teacher_key,
    teacher_logits,
)


def position_mask(kind: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[b, s]`` positions to average over: ``tokens`` = real tokens; ``labelled`` = positions
    with a token label (``labels != -100``; real tokens when labels are per example)."""
    attention = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if kind == "labelled" and labels is not None and labels.dim() == 2:
        return (labels != -100) & attention
    return attention


class DistilBERT(Method):
    name = "distilbert"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Equal hidden sizes for the cosine term; teacher logits for the soft term."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["cos_weight"] > 0:
            for name, t in context.teachers.items():
                if s.hidden_size != t.hidden_size:
                    issues.append(FeatureIssue(f"teacher '{name}'", "cos_weight", (
                        f"distilbert: the cosine term compares hidden states of equal width, but the student has "
                        f"hidden_size {s.hidden_size} and teacher '{name}' {t.hidden_size}; give the student the "
                        "teacher's width (e.g. student.init truncate) or set cos_weight: 0")))
        if config["soft_weight"] > 0:
            issues += logits_issues(cls.name, context, field="soft_weight", fix="or set soft_weight: 0")
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        teacher = context.teachers[self.teacher_name]
        # The last hidden states: for post-LN encoders the final normalised output, as the
        # reference's transformer.output.
        self.student_tap = hidden_tap(context.student.num_layers)
        self.teacher_tap = hidden_tap(teacher.num_layers)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        cos = self.config["cos_weight"] > 0
        models = {STUDENT: ForwardRequest(features=frozenset({self.student_tap} if cos else ()))}
        if cos or self.config["soft_weight"] > 0:
            models[teacher_key(self.teacher_name)] = ForwardRequest(features=frozenset({self.teacher_tap} if cos else ()))
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_out = outputs.student
        terms: dict[str, torch.Tensor] = {}
        if cfg["soft_weight"] > 0:
            z, zt = s_out.logits, teacher_logits(outputs, self.teacher_name, self.name)
            mask = position_mask(cfg["soft_mask"], outputs.batch) if z.dim() == 3 else None
            terms["soft"] = cfg["soft_weight"] * losses.kl_divergence(z, zt, cfg["temperature"], mask)
        if cfg["hard_weight"] > 0 and s_out.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * s_out.task_loss
        if cfg["cos_weight"] > 0:
            t_hidden = outputs.teacher(self.teacher_name).features[self.teacher_tap]
            terms["cos"] = cfg["cos_weight"] * losses.cosine_distance(
                s_out.features[self.student_tap], t_hidden, position_mask(cfg["cos_mask"], outputs.batch))
        return terms
