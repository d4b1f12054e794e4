"""RAIL-KD (Haidar et al., 2022): distil randomly chosen intermediate teacher layers, redrawn
every epoch, through mean-pooled, projected and L2-normalised sentence representations."""

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
    random_map,
    stride_map,
    teacher_key,
)


def normalized_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_b ‖s/‖s‖ − t/‖t‖‖²`` of ``[b, u]`` vectors: the squared Euclidean distance of the
    unit vectors, summed over the dimensions and averaged over the examples."""
    diff = F.normalize(student.float(), dim=-1) - F.normalize(teacher.float(), dim=-1)
    return (diff**2).sum(-1).mean()


def pair_count(config: Mapping[str, Any], student_layers: int) -> int:
    """Distilled layer pairs: the S−1 intermediate layers, plus embeddings and final when on."""
    return student_layers - 1 + int(config["embeddings"]) + int(config["final"])


class RailKD(Method):
    name = "rail-kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher at least as deep as the student; at least one layer pair; one α per pair;
        teacher logits for the soft loss."""
        s = context.student
        issues: list[FeatureIssue] = []
        for name, t in context.teachers.items():
            if t.num_layers < s.num_layers:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", None,
                    f"rail-kd: picks {s.num_layers - 1} intermediate layers of the teacher for the student's, but the "
                    f"student has {s.num_layers} layers and teacher '{name}' {t.num_layers}; use a teacher at least as "
                    "deep as the student"))
        pairs = pair_count(config, s.num_layers)
        if pairs == 0:
            issues.append(FeatureIssue(
                "student", "final",
                "rail-kd: a 1-layer student has no intermediate layer to distil; set final: true or embeddings: true"))
        alpha = config["layer_wise_alpha"]
        if isinstance(alpha, list):
            if config["variant"] != "layer_wise":
                issues.append(FeatureIssue("student", "layer_wise_alpha",
                                           "rail-kd: per-layer weights apply to variant layer_wise only; give one "
                                           "number or use variant: layer_wise"))
            elif pairs and len(alpha) != pairs:
                issues.append(FeatureIssue("student", "layer_wise_alpha",
                                           f"rail-kd: layer_wise_alpha has {len(alpha)} weights, but {pairs} layer "
                                           "pairs are distilled (embeddings first, final last when on)"))
        issues += prediction_issues(cls.name, config, context)
        if config["inter_weight"] <= 0 and config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "inter_weight",
                                       "rail-kd: inter_weight, soft_weight and hard_weight are all 0, so the method "
                                       "adds no loss; give one of them a positive weight"))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        s, t = context.student, next(iter(context.teachers.values()))
        m = pair_count(self.config, s.num_layers) if self.config["variant"] == "concat" else 1
        u = self.config["projection_size"]
        # Both sides are projected into the common space (with bias, as in the paper and the
        # reference); layer_wise shares one projection per model across all pairs, so it stays
        # meaningful when the teacher layers are redrawn.
        self.student_proj = nn.Linear(m * s.hidden_size, u)
        self.teacher_proj = nn.Linear(m * t.hidden_size, u)

    def _depths(self) -> tuple[int, int]:
        return next(iter(self.context.teachers.values())).num_layers, self.context.student.num_layers

    def initial_state(self) -> dict[str, Any]:
        """``teacher_layers``: the drawn intermediate teacher hidden states (1..T−1, sorted);
        ``block``: the schedule block they were drawn for (−1: none yet); ``epoch`` and
        ``iteration``: where they were drawn."""
        t, s = self._depths()
        if self.config["layer_selection"] == "stride":
            return {"teacher_layers": stride_map(t, s)[1:-1], "block": 0, "epoch": 0, "iteration": 0}
        return {"teacher_layers": [], "block": -1, "epoch": -1, "iteration": -1}

    def _block(self, step: StepContext) -> int:
        every = self.config["resample_every_epochs"]
        return step.epoch // every if every > 0 else step.iteration // self.config["resample_every_steps"]

    def _teacher_layers(self, step: StepContext, state: dict[str, Any]) -> list[int]:
        if self.config["layer_selection"] == "random":
            block = self._block(step)
            if block != state["block"]:
                t, s = self._depths()
                state.update(teacher_layers=random_map(t, s, step.generator)[1:-1], block=block, epoch=step.epoch,
                             iteration=step.iteration)
        return list(state["teacher_layers"])

    def pairs(self, teacher_layers: list[int]) -> list[tuple[str, str]]:
        """(student tap, teacher tap) per distilled pair, embeddings first and final last."""
        t, s = self._depths()
        index = list(zip(range(1, s), teacher_layers, strict=True))
        if self.config["embeddings"]:
            index.insert(0, (0, 0))
        if self.config["final"]:
            index.append((s, t))
        return [(hidden_tap(i), hidden_tap(j)) for i, j in index]

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        pairs = self.pairs(self._teacher_layers(step, state)) if self.config["inter_weight"] > 0 else []
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(s for s, _ in pairs)),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset(t for _, t in pairs),
                                                           candidates=self._candidates(pairs)),
        })

    def _candidates(self, pairs: list[tuple[str, str]]) -> frozenset[str]:
        """Every teacher hidden state a later draw may pick (a teacher cache records them all)."""
        if self.config["layer_selection"] != "random" or not pairs:
            return frozenset()
        t, _ = self._depths()
        return frozenset(t_tap for _, t_tap in pairs) | {hidden_tap(j) for j in range(1, t)}

    def rail_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """The RAIL distance of aligned student and teacher hidden states ``[b, s, h]``."""
        dtype = self.student_proj.weight.dtype
        s_pooled = [losses.mean_pool(h.float(), attention_mask).to(dtype) for h in student]
        t_pooled = [losses.mean_pool(h.float(), attention_mask).to(dtype) for h in teacher]
        if self.config["variant"] == "concat":
            return normalized_distance(self.student_proj(torch.cat(s_pooled, -1)),
                                       self.teacher_proj(torch.cat(t_pooled, -1)))
        alpha = self.config["layer_wise_alpha"]
        alphas = alpha if isinstance(alpha, list) else [alpha] * len(s_pooled)
        return sum((a * normalized_distance(self.student_proj(hs), self.teacher_proj(ht))
                    for a, hs, ht in zip(alphas, s_pooled, t_pooled, strict=True)), start=torch.zeros(()))

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_out, t_out = outputs.student, outputs.teacher(self.teacher_name)
        mask = outputs.batch["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        if cfg["inter_weight"] > 0:
            pairs = self.pairs(list(state["teacher_layers"]))
            terms["rail"] = cfg["inter_weight"] * self.rail_loss(
                [s_out.features[s] for s, _ in pairs], [t_out.features[t] for _, t in pairs], mask)
        return terms | prediction_terms(self.name, cfg, outputs, self.teacher_name)
