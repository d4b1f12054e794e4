"""MiniLM (Wang et al., 2020): transfer the self-attention distributions and the value relation
of one teacher layer to the student's last layer."""

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
    ModelShape,
    PassPlan,
    PassView,
    StepContext,
    all_reduce_mean_over_tp,
    losses,
    raise_issues,
    teacher_key,
)


def resolve_layer(layer: int, num_layers: int) -> int | None:
    """0-based index of a 1-based layer number, negative counting from the top; None if out of range."""
    if 1 <= layer <= num_layers:
        return layer - 1
    if -num_layers <= layer <= -1:
        return num_layers + layer
    return None


def layer_issue(method: str, layer: int, name: str, t: ModelShape) -> FeatureIssue | None:
    """The issue of a ``teacher_layer`` outside teacher ``name``, or None."""
    if resolve_layer(layer, t.num_layers) is not None:
        return None
    return FeatureIssue(f"teacher '{name}'", "teacher_layer",
                        f"{method}: teacher_layer is {layer}, but teacher '{name}' has {t.num_layers} layers; use 1 to "
                        f"{t.num_layers}, or -1 to -{t.num_layers} counting from the top (-1 = last)")


def is_causal(context: MethodContext) -> bool:
    """Causal relations when any model is a decoder: its positions never see later ones."""
    return any(m.family == "decoder" for m in (context.student, *context.teachers.values()))


class MiniLM(Method):
    name = "minilm"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher_layer inside the teacher; equal head counts for the per-head attention KL and
        equal key/value head counts for the per-head value relation; at least one term on."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["attention_weight"] <= 0 and config["value_weight"] <= 0:
            issues.append(FeatureIssue("student", "attention_weight",
                                       "minilm: attention_weight and value_weight are both 0, so nothing is distilled; "
                                       "turn one of them on"))
        for name, t in context.teachers.items():
            if (issue := layer_issue(cls.name, config["teacher_layer"], name, t)) is not None:
                issues.append(issue)
            if config["attention_weight"] > 0 and s.num_attention_heads != t.num_attention_heads:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", "attention_weight",
                    f"minilm: the attention transfer compares heads one to one, but the student has {s.num_attention_heads} "
                    f"heads and teacher '{name}' {t.num_attention_heads}; give the student {t.num_attention_heads} heads, use minilmv2 "
                    f"(relation heads), or set attention_weight: 0"))
            if config["value_weight"] > 0 and s.num_kv_heads != t.num_kv_heads:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", "value_weight",
                    f"minilm: the value relation compares key/value heads one to one, but the student has "
                    f"{s.num_kv_heads} and teacher '{name}' {t.num_kv_heads}; give the student {t.num_kv_heads} "
                    f"key/value heads, use minilmv2 (relation heads), or set value_weight: 0"))
        return issues

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        t = context.teachers[self.teacher_name]
        t_layer = resolve_layer(self.config["teacher_layer"], t.num_layers)
        s_layer = context.student.num_layers - 1
        self.student_taps: dict[str, str] = {}  # term -> tap
        self.teacher_taps: dict[str, str] = {}
        if self.config["attention_weight"] > 0:
            # Scores, not probs: a masked log-softmax of them is log A without log(0).
            self.student_taps["attention"] = f"layers.{s_layer}.attention.scores"
            self.teacher_taps["attention"] = f"layers.{t_layer}.attention.scores"
        if self.config["value_weight"] > 0:
            self.student_taps["value"] = f"layers.{s_layer}.attention.value"
            self.teacher_taps["value"] = f"layers.{t_layer}.attention.value"

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(self.student_taps.values())),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset(self.teacher_taps.values())),
        })

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        s_feats, t_feats = outputs.student.features, outputs.teacher(self.teacher_name).features
        valid = losses.attention_valid_mask(outputs.batch["attention_mask"], causal=is_causal(self.context))
        terms: dict[str, torch.Tensor] = {}
        if "attention" in self.student_taps:
            s_log = losses.masked_log_softmax(s_feats[self.student_taps["attention"]], valid)
            t_log = losses.masked_log_softmax(t_feats[self.teacher_taps["attention"]], valid)
            terms["attention"] = self.config["attention_weight"] * all_reduce_mean_over_tp(
                losses.attention_kl(s_log, t_log, valid, log_probs=True))
        if "value" in self.student_taps:
            s_log = losses.relation_log_softmax(s_feats[self.student_taps["value"]], valid)
            t_log = losses.relation_log_softmax(t_feats[self.teacher_taps["value"]], valid)
            # Local heads of both models are the same head indices (equal counts, equal shards).
            terms["value"] = self.config["value_weight"] * all_reduce_mean_over_tp(
                losses.attention_kl(s_log, t_log, valid, log_probs=True))
        return terms
