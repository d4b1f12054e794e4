"""MGSKD (Liu et al., 2022): multi-granularity structural distillation — pair-wise and
triplet-wise relations of tokens and spans in the lower layers, of samples in the upper ones."""

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
    losses,
    prediction_issues,
    prediction_terms,
    raise_issues,
    stride_map,
    teacher_key,
)
from gkd_methods_builtin.mgskd.relations import draw_spans, sample_loss, span_means, token_loss


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher hidden state of each student hidden state 0..S: stride ``k = T // S`` for
    0..S−1, the last teacher hidden state for the last student one."""
    return [*stride_map(teacher_layers, student_layers)[:-1], teacher_layers]


class MGSKD(Method):
    name = "mgskd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Widths divisible by the relation heads and a teacher at least as deep as the student
        (structural losses); teacher logits for the soft loss; at least one loss term."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["intermediate"]:
            heads = config["relation_heads"]
            models = [("student", s), *((f"teacher '{n}'", t) for n, t in context.teachers.items())]
            for label, shape in models:
                if shape.hidden_size % heads:
                    issues.append(FeatureIssue(
                        label, "relation_heads",
                        f"mgskd: relation_heads {heads} must divide the hidden size, but the {label} has "
                        f"{shape.hidden_size}; use a divisor of every model's hidden size"))
            issues += depth_issues(cls.name, context, mapping="maps student layers onto teacher layers with stride T // S")
        issues += prediction_issues(cls.name, config, context)
        structural = config["intermediate"] and (
            config["token_weight"] > 0 or config["sample_weight"] > 0
            or (config["span_weight"] > 0 and config["span_max_rate"] > 0))
        if not structural and config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "intermediate",
                                       "mgskd: no structural loss is on (intermediate false or every level weight 0) "
                                       "and soft_weight and hard_weight are 0, so the method adds no loss; turn one "
                                       "of them on"))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))

    def pairs(self) -> list[tuple[str, str]]:
        """(student tap, teacher tap) of layer pairs 0..S (0 = embeddings); none without the
        structural losses."""
        if not self.config["intermediate"]:
            return []
        t, s = next(iter(self.context.teachers.values())).num_layers, self.context.student.num_layers
        return [(hidden_tap(j), hidden_tap(m)) for j, m in enumerate(layer_map(t, s))]

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        pairs = self.pairs()
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(s for s, _ in pairs)),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset(t for _, t in pairs)),
        })

    def structural_terms(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                         attention_mask: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Unweighted ``token``, ``span`` and ``sample`` losses, each summed over its layer pairs
        (a level without layer pairs, or switched off by a 0 weight or span rate, is left out)."""
        cfg = self.config
        heads, k1, k2, m = cfg["relation_heads"], cfg["triplet_k1"], cfg["triplet_k2"], cfg["sample_level_m"]
        keep = attention_mask.bool()
        lower = list(zip(student[:m], teacher[:m], strict=True))
        upper = list(zip(student[m:], teacher[m:], strict=True))
        terms: dict[str, torch.Tensor] = {}
        if lower and cfg["token_weight"] > 0:
            terms["token"] = sum((token_loss(s, t, keep, heads, k1, k2) for s, t in lower), start=torch.zeros(()))
        if lower and cfg["span_weight"] > 0 and cfg["span_max_rate"] > 0:
            # One draw per step, shared by every layer pair and both models.
            assign, spans = draw_spans(attention_mask, cfg["span_max_rate"], generator)
            terms["span"] = sum((token_loss(span_means(s, assign), span_means(t, assign), spans, heads, k1, k2)
                                 for s, t in lower), start=torch.zeros(()))
        if upper and cfg["sample_weight"] > 0:
            terms["sample"] = sum((sample_loss(losses.mean_pool(s.float(), attention_mask),
                                               losses.mean_pool(t.float(), attention_mask), heads)
                                   for s, t in upper), start=torch.zeros(()))
        return terms

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_out, t_out = outputs.student, outputs.teacher(self.teacher_name)
        mask = outputs.batch["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        pairs = self.pairs()
        if pairs:
            raw = self.structural_terms([s_out.features[s] for s, _ in pairs], [t_out.features[t] for _, t in pairs],
                                        mask, step.generator)
            terms = {k: cfg[f"{k}_weight"] * v for k, v in raw.items()}
        return terms | prediction_terms(self.name, cfg, outputs, self.teacher_name)
