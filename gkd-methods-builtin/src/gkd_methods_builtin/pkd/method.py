"""Patient KD (Sun et al., 2019): normalised hidden-state MSE on intermediate layers (PKD-Skip or
PKD-Last), plus the prediction loss (1−α)·hard + α·soft."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

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
    hidden_tap,
    logits_issues,
    losses,
    raise_issues,
    stride_map,
    teacher_key,
    teacher_logits,
)


def layer_pairs(config: Mapping[str, Any], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices the patience loss compares (0 = embeddings, j =
    output of layer j); empty when the teacher is shallower than the student."""
    s, t = student_layers, teacher_layers
    if t < s:
        return []
    if config["layer_strategy"] == "skip":
        boundaries = stride_map(t, s)
        inner = [(j, boundaries[j]) for j in range(1, s)]
    else:  # the last S−1 intermediate teacher layers, in order
        inner = [(j, t - s + j) for j in range(1, s)]
    pairs = [(0, 0)] if config["use_embed"] else []
    pairs += inner
    if not config["wo_final"]:
        pairs.append((s, t))
    return pairs


class PKD(Method):
    name = "pkd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher at least as deep as the student, equal widths and at least one layer pair for
        the patience loss; teacher logits for the soft term."""
        s = context.student
        issues: list[FeatureIssue] = []
        for name, t in context.teachers.items():
            label = f"teacher '{name}'"
            shallow = depth_issues(cls.name, context, teachers=[name])
            if shallow:
                issues += shallow
                continue
            if config["beta"] <= 0:
                continue
            if s.hidden_size != t.hidden_size:
                issues.append(FeatureIssue(label, "beta", (
                    f"pkd: the patience loss compares hidden states of equal width, but the student has hidden_size "
                    f"{s.hidden_size} and {label} {t.hidden_size}; give the student the teacher's width or set "
                    "beta: 0")))
            if not layer_pairs(config, s.num_layers, t.num_layers):
                issues.append(FeatureIssue(label, "wo_final", (
                    f"pkd: a {s.num_layers}-layer student has no intermediate layer to pair with {label}; set "
                    "wo_final: false or use_embed: true, or beta: 0")))
        if config["alpha"] > 0:
            issues += logits_issues(cls.name, context, field="alpha", fix="or set alpha: 0 (no soft term)")
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return {"hard_loss": "alpha"} if config["alpha"] < 1 else {}

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))

    def pairs(self) -> list[tuple[str, str]]:
        """(student tap, teacher tap) of every patience pair (none when beta is 0)."""
        if self.config["beta"] <= 0:
            return []
        t = self.context.teachers[self.teacher_name].num_layers
        return [(hidden_tap(i), hidden_tap(j)) for i, j in layer_pairs(self.config, self.context.student.num_layers, t)]

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        pairs = self.pairs()
        models = {STUDENT: ForwardRequest(features=frozenset(s for s, _ in pairs))}
        if pairs or self.config["alpha"] > 0:
            models[teacher_key(self.teacher_name)] = ForwardRequest(features=frozenset(t for _, t in pairs))
        return PassPlan(models)

    def patience(self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MSE of one (optionally L2-normalised) hidden-state pair: on the summary token, or on
        every real token (padding excluded from the mean)."""
        s, t = student.float(), teacher.float()
        mask: torch.Tensor | None = attention_mask
        if self.config["only_cls"]:
            family = self.context.student.family
            s, t = losses.summary_token(s, attention_mask, family), losses.summary_token(t, attention_mask, family)
            mask = None
        if self.config["normalized"]:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        return losses.mse(s, t, mask)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_out = outputs.student
        mask = outputs.batch["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        pairs = self.pairs()
        if pairs:
            t_feats = outputs.teacher(self.teacher_name).features
            terms["patience"] = cfg["beta"] * torch.stack(
                [self.patience(s_out.features[s], t_feats[t], mask) for s, t in pairs]).sum()
        if cfg["alpha"] > 0:
            z, zt = s_out.logits, teacher_logits(outputs, self.teacher_name, self.name)
            terms["soft"] = cfg["alpha"] * losses.soft_loss(cfg["soft_loss"], z, zt, cfg["temperature"],
                                                            losses.logits_mask(z, mask))
        if cfg["alpha"] < 1 and s_out.task_loss is not None:
            terms["hard"] = (1 - cfg["alpha"]) * s_out.task_loss
        return terms
