"""MiniLMv2 (Wang et al., 2021): transfer the query-query, key-key and value-value self-attention
relations of one teacher layer to the student's last layer, over R relation heads."""

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
    gather_heads,
    losses,
    raise_issues,
    teacher_key,
)

KINDS = ("query", "key", "value")


def resolve_layer(layer: int, num_layers: int) -> int | None:
    """0-based index of a 1-based layer number, negative counting from the top; None if out of range."""
    if 1 <= layer <= num_layers:
        return layer - 1
    if -num_layers <= layer <= -1:
        return num_layers + layer
    return None


def split_relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, h, s, d]`` → the concatenated ``[b, s, h·d]`` re-split into ``[b, heads, s, h·d/heads]``."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, heads, h * d // heads).transpose(1, 2)


def _widths(m: ModelShape) -> dict[str, tuple[str, int]]:
    """Concatenated width of each relation input: queries span all heads, keys/values the KV heads (GQA)."""
    return {"query": ("heads", m.num_attention_heads * m.head_dim), "key": ("key/value heads", m.num_kv_heads * m.head_dim),
            "value": ("key/value heads", m.num_kv_heads * m.head_dim)}


class MiniLMv2(Method):
    name = "minilmv2"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher_layer inside the teacher; relation_heads dividing every concatenated width the
        enabled relations re-split (heads·head_dim, and kv_heads·head_dim for keys and values)."""
        issues: list[FeatureIssue] = []
        on = [k for k in KINDS if config[f"{k}_weight"] > 0]
        if not on:
            issues.append(FeatureIssue("student", "query_weight",
                                       "minilmv2: query_weight, key_weight and value_weight are all 0, so nothing is "
                                       "distilled; turn one of them on"))
        r = config["relation_heads"]
        models = [("student", "the student", context.student)]
        models += [(f"teacher '{n}'", f"teacher '{n}'", t) for n, t in context.teachers.items()]
        for model, label, m in models:
            bad = {}
            for kind in on:
                what, width = _widths(m)[kind]
                if width % r:
                    bad.setdefault(what, width)
            for what, width in bad.items():
                issues.append(FeatureIssue(
                    model, "relation_heads",
                    f"minilmv2: relation_heads is {r}, which does not divide the concatenated width of {label}'s "
                    f"{what} ({width} = {what} × head size {m.head_dim}); use a divisor of {width}"))
        for name, t in context.teachers.items():
            if resolve_layer(config["teacher_layer"], t.num_layers) is None:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", "teacher_layer",
                    f"minilmv2: teacher_layer is {config['teacher_layer']}, but teacher '{name}' has {t.num_layers} "
                    f"layers; use 1 to {t.num_layers}, or -1 to -{t.num_layers} counting from the top (-1 = last)"))
        return issues

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        t = context.teachers[self.teacher_name]
        t_layer = resolve_layer(self.config["teacher_layer"], t.num_layers)
        s_layer = context.student.num_layers - 1
        self.kinds = [k for k in KINDS if self.config[f"{k}_weight"] > 0]
        self.student_taps = {k: f"layers.{s_layer}.attention.{k}" for k in self.kinds}
        self.teacher_taps = {k: f"layers.{t_layer}.attention.{k}" for k in self.kinds}

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(self.student_taps.values())),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset(self.teacher_taps.values())),
        })

    def relation_kl(self, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean KL over relation heads and valid query rows of one of Q, K, V (this rank's shards in)."""
        r, tp = self.config["relation_heads"], self.context.tensor_parallel
        if r % tp == 0:
            # Rank boundaries of the concatenated width fall on relation-head boundaries: this
            # rank's heads hold R/tp whole relation heads, the same ones for both models.
            local = r // tp
            kl = losses.attention_kl(losses.relation_log_softmax(split_relation_heads(student, local), valid),
                                     losses.relation_log_softmax(split_relation_heads(teacher, local), valid),
                                     valid, log_probs=True)
            return all_reduce_mean_over_tp(kl)
        # A relation head would straddle two ranks: gather every head, compute the same loss on
        # every rank (the gather's backward keeps this rank's slice of the gradient).
        s_full, t_full = gather_heads(student), gather_heads(teacher)
        return losses.attention_kl(losses.relation_log_softmax(split_relation_heads(s_full, r), valid),
                                   losses.relation_log_softmax(split_relation_heads(t_full, r), valid),
                                   valid, log_probs=True)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        s_feats, t_feats = outputs.student.features, outputs.teacher(self.teacher_name).features
        causal = any(m.family == "decoder" for m in (self.context.student, *self.context.teachers.values()))
        valid = losses.attention_valid_mask(outputs.batch["attention_mask"], causal=causal)
        return {k: self.config[f"{k}_weight"] * self.relation_kl(s_feats[self.student_taps[k]],
                                                                 t_feats[self.teacher_taps[k]], valid)
                for k in self.kinds}
