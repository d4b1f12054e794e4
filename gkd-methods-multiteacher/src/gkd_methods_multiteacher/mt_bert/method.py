"""MT-BERT (Wu, Wu and Huang, 2021): distil from several teachers at once. Each teacher's soft
loss is weighted per example by ``1 / (1 + that teacher's own gold-label loss)``, so a teacher
counts less where it is wrong; a PKD-style hidden-state term goes through one trainable
projection per teacher, so teachers may differ in depth and in width."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gkd.methods import (
    STUDENT,
    FeatureIssue,
    ForwardRequest,
    GkdError,
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
    stride_map,
    teacher_key,
    teacher_logits,
)


def layer_pairs(config: Mapping[str, Any], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices of the patience term for one teacher (0 =
    embeddings, j = output of layer j): PKD-Skip's ``stride_map`` pairs ``(j, j·k)`` for
    j = 1…S−1, plus ``(0, 0)`` with ``use_embed`` and ``(S, T)`` unless ``wo_final``; empty when
    the teacher is shallower than the student."""
    s, t = student_layers, teacher_layers
    if t < s:
        return []
    boundaries = stride_map(t, s)
    pairs = [(0, 0)] if config["use_embed"] else []
    pairs += [(j, boundaries[j]) for j in range(1, s)]
    if not config["wo_final"]:
        pairs.append((s, t))
    return pairs


def module_key(teacher: str) -> str:
    """The key of a teacher's projection in ``MTBERT.proj``: teacher names may contain ``.``,
    which ``nn.ModuleDict`` keys cannot, so ``.`` becomes ``:`` (no teacher name has a ``:``,
    so distinct names keep distinct keys)."""
    return teacher.replace(".", ":")


class MTBERT(Method):
    name = "mt-bert"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """For the patience term: teachers at least as deep as the student, at least one layer
        pair, equal widths without a projection; for the soft term: teacher logits as wide as
        the student's; and some term switched on."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["beta"] > 0:
            for name, t in context.teachers.items():
                label = f"teacher '{name}'"
                if t.num_layers < s.num_layers:
                    issues.append(FeatureIssue(label, "beta", (
                        f"{cls.name}: the patience term maps every student layer onto a teacher layer, but the student "
                        f"has {s.num_layers} layers and {label} {t.num_layers}; use teachers at least as deep as the "
                        "student or set beta: 0")))
                    continue
                if config["project"] == "none" and t.hidden_size != s.hidden_size:
                    issues.append(FeatureIssue(label, "project", (
                        f"{cls.name}: project: none compares hidden states of equal width, but the student has "
                        f"hidden_size {s.hidden_size} and {label} {t.hidden_size}; set project: teacher or student")))
                if not layer_pairs(config, s.num_layers, t.num_layers):
                    issues.append(FeatureIssue(label, "wo_final", (
                        f"{cls.name}: a {s.num_layers}-layer student has no intermediate layer to pair with {label}; "
                        "set wo_final: false or use_embed: true, or beta: 0")))
        if config["soft_weight"] > 0:
            issues += logits_issues(cls.name, context, field="soft_weight", fix="or set soft_weight: 0 (no soft term)")
        if config["soft_weight"] <= 0 and config["beta"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "soft_weight", (
                f"{cls.name}: soft_weight, beta and hard_weight are all 0, so the method adds no loss; give one of "
                "them a positive weight")))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        cfg, s = self.config, context.student
        # per teacher, the (student tap, teacher tap) pairs of the patience term
        self.pairs: dict[str, list[tuple[str, str]]] = {
            name: ([(hidden_tap(i), hidden_tap(j)) for i, j in layer_pairs(cfg, s.num_layers, t.num_layers)]
                   if cfg["beta"] > 0 else [])
            for name, t in context.teachers.items()}
        # per teacher (module_key), its projection; empty with project: none or beta: 0
        self.proj = nn.ModuleDict()
        if cfg["beta"] > 0 and cfg["project"] != "none":
            for name, t in context.teachers.items():
                shape = (t.hidden_size, s.hidden_size) if cfg["project"] == "teacher" else (s.hidden_size, t.hidden_size)
                self.proj[module_key(name)] = nn.Linear(*shape)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        student = frozenset(s for pairs in self.pairs.values() for s, _ in pairs)
        models = {STUDENT: ForwardRequest(features=student)}
        for name, pairs in self.pairs.items():
            if pairs or self.config["soft_weight"] > 0:
                models[teacher_key(name)] = ForwardRequest(features=frozenset(t for _, t in pairs))
        return PassPlan(models)

    def soft_per_teacher(self, outputs: PassView) -> dict[str, torch.Tensor]:
        """``mean_b[soft_{i,b} / (1 + Ĥ_{i,b})]`` for every teacher i (unweighted)."""
        cfg, z = self.config, outputs.student.logits
        mask = losses.logits_mask(z, outputs.batch.get("attention_mask"))
        result = {}
        for name in self.context.teacher_names:
            zt = teacher_logits(outputs, name, self.name)
            own = outputs.teacher(name).task_loss_per_example
            if own is None:
                raise GkdError(f"{self.name}: weights teacher '{name}' by its own loss on the gold labels, but the batch "
                               "has no labels; use a task with labels or set soft_weight: 0")
            soft = losses.soft_loss_per_example(cfg["soft_loss"], z, zt, cfg["temperature"], mask)
            result[name] = (soft / (1.0 + own.detach().float())).mean()
        return result

    def patience(self, teacher: str, student: torch.Tensor, hidden: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """MSE of one hidden-state pair through the teacher's projection: on the summary token,
        or on every real token (padding excluded from the mean)."""
        cfg = self.config
        s, t, mask = student, hidden, attention_mask
        if cfg["only_cls"]:
            s = losses.summary_token(s, attention_mask, self.context.student.family)
            t = losses.summary_token(t, attention_mask, self.context.teachers[teacher].family)
            mask = None
        if cfg["project"] != "none":
            proj = self.proj[module_key(teacher)]
            if cfg["project"] == "teacher":
                t = proj(t.to(proj.weight.dtype))
            else:
                s = proj(s.to(proj.weight.dtype))
        s, t = s.float(), t.float()
        if cfg["normalized"]:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        return losses.mse(s, t, mask)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg, student = self.config, outputs.student
        terms: dict[str, torch.Tensor] = {}
        if cfg["soft_weight"] > 0:
            terms["soft"] = cfg["soft_weight"] * torch.stack(list(self.soft_per_teacher(outputs).values())).sum()
        if cfg["beta"] > 0:
            mask = outputs.batch["attention_mask"]
            values = [self.patience(name, student.features[s], outputs.teacher(name).features[t], mask)
                      for name, pairs in self.pairs.items() for s, t in pairs]
            terms["patience"] = cfg["beta"] * torch.stack(values).sum()
        if cfg["hard_weight"] > 0 and student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * student.task_loss
        return terms
