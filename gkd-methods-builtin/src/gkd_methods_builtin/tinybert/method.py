"""TinyBERT (Jiao et al., 2020): embedding, hidden-state and attention-score distillation
through a learned projection ``W_h``, then prediction-layer distillation."""

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
    all_reduce_mean_over_tp,
    depth_issues,
    hidden_tap,
    logits_issues,
    losses,
    raise_issues,
    random_map,
    teacher_key,
    teacher_logits,
    uniform_map,
)


def score_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE of attention scores over valid (query, key) pairs of every head.

    Masked scores hold a large negative fill value; they are dropped before subtracting so
    that the fill value never enters the arithmetic.
    """
    v = valid.expand_as(student)
    diff = torch.where(v, student.float() - teacher.float(), torch.zeros((), device=student.device))
    # Heads are sharded over tensor-parallel ranks in equal shares: the mean of the local
    # means is the global mean, and every rank then holds the same loss.
    return all_reduce_mean_over_tp((diff**2).sum() / v.sum().clamp_min(1))


def _pair(student_tap: str, teacher_tap: str) -> str:
    """A layer pair's name in logged parts: ``2-4`` is student 2 against teacher 4, counted as
    :func:`hidden_tap` counts hidden states (0 = embeddings, ``i`` = output of layer ``i - 1``)
    for hidden states, and as layers (from 0) for attention scores."""

    def index(tap: str) -> int:
        return 0 if tap == "embeddings" else int(tap.split(".")[1]) + tap.endswith(".output")

    return f"{index(student_tap)}-{index(teacher_tap)}"


class TinyBERT(Method):
    name = "tinybert"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Equal head counts for the attention loss; a teacher at least as deep as the student
        for the layer mapping; teacher logits for the prediction loss."""
        s = context.student
        issues: list[FeatureIssue] = []
        for name, t in context.teachers.items():
            if config["attention"] and s.num_attention_heads != t.num_attention_heads:
                issues.append(FeatureIssue(
                    f"teacher '{name}'", "attention",
                    f"tinybert: the attention loss needs equal head counts (student {s.num_attention_heads}, teacher '{name}' "
                    f"{t.num_attention_heads}); set config.attention: false or give the student as many heads"))
            if config["hidden"] or config["attention"]:
                issues += depth_issues(cls.name, context, teachers=[name])
        if config["prediction"]:
            issues += logits_issues(cls.name, context, field="prediction", fix="or set prediction: false")
        return issues

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        s, t = context.student, next(iter(context.teachers.values()))
        # One projection shared by every hidden pair, embeddings included. Bias-free, as W_h
        # in eq. 8 of the paper (the reference code's nn.Linear had a bias).
        self.proj = nn.Linear(s.hidden_size, t.hidden_size, bias=False)

    @property
    def _maps_layers(self) -> bool:
        return bool(self.config["hidden"] or self.config["attention"])

    def initial_state(self) -> dict[str, Any]:
        t, s = next(iter(self.context.teachers.values())).num_layers, self.context.student.num_layers
        return {"teacher_map": uniform_map(t, s) if self._maps_layers else [], "map_block": -1}

    def _teacher_map(self, step: StepContext, state: dict[str, Any]) -> list[int]:
        if self.config["layer_mapping"] == "random" and self._maps_layers:
            block = step.iteration // self.config["random_every_steps"]
            if block != state["map_block"]:
                t, s = next(iter(self.context.teachers.values())).num_layers, self.context.student.num_layers
                state["teacher_map"] = random_map(t, s, step.generator)
                state["map_block"] = block
        return list(state["teacher_map"])

    def pairs(self, teacher_map: list[int]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(hidden pairs, attention pairs) as (student tap, teacher tap) names."""
        cfg, s_layers = self.config, self.context.student.num_layers
        hidden: list[tuple[str, str]] = []
        if cfg["embeddings"]:
            hidden.append((hidden_tap(0), hidden_tap(0)))
        if cfg["hidden"]:
            hidden += [(hidden_tap(j), hidden_tap(teacher_map[j])) for j in range(1, s_layers + 1)]
        attention: list[tuple[str, str]] = []
        if cfg["attention"]:
            # Student layer j imitates the last teacher layer of its block.
            attention = [(f"layers.{j}.attention.scores", f"layers.{teacher_map[j + 1] - 1}.attention.scores")
                         for j in range(s_layers)]
        return hidden, attention

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        hidden, attention = self.pairs(self._teacher_map(step, state))
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(s for s, _ in hidden + attention)),
            teacher_key(self.teacher_name): ForwardRequest(features=frozenset(t for _, t in hidden + attention),
                                                           candidates=self._candidates(hidden, attention)),
        })

    def _candidates(self, hidden: list[tuple[str, str]], attention: list[tuple[str, str]]) -> frozenset[str]:
        """``layer_mapping: random``: every teacher tap a later draw may pick (a teacher cache records them all)."""
        if self.config["layer_mapping"] != "random" or not self._maps_layers:
            return frozenset()
        t = next(iter(self.context.teachers.values())).num_layers
        taps = {hidden_tap(i) for i in range(t + 1)} if hidden else set()
        if attention:
            taps |= {f"layers.{i}.attention.scores" for i in range(t)}
        return frozenset(taps)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        hidden, attention = self.pairs(list(state["teacher_map"]))
        s_out, t_out = outputs.student, outputs.teacher(self.teacher_name)
        mask = outputs.batch["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        if hidden:
            pairs = {_pair(s, t): losses.mse(self.proj(s_out.features[s]), t_out.features[t], mask) for s, t in hidden}
            terms["hidden"] = cfg["hidden_weight"] * sum(pairs.values(), start=torch.zeros(()))
            terms |= {f"hidden/{k}": cfg["hidden_weight"] * v for k, v in pairs.items()}
        if attention:
            valid = losses.attention_valid_mask(mask, causal=self.context.student.family == "decoder")
            pairs = {_pair(s, t): score_mse(s_out.features[s], t_out.features[t], valid) for s, t in attention}
            terms["attention"] = cfg["attention_weight"] * sum(pairs.values(), start=torch.zeros(()))
            terms |= {f"attention/{k}": cfg["attention_weight"] * v for k, v in pairs.items()}
        if cfg["prediction"]:
            terms["prediction"] = cfg["prediction_weight"] * losses.soft_cross_entropy(
                s_out.logits, teacher_logits(outputs, self.teacher_name, self.name), cfg["temperature"],
                losses.logits_mask(s_out.logits, mask))
        return terms
