"""SID (Aguilar et al., 2020): stacked internal distillation. The student's layers are distilled
bottom-up, one more layer pair per phase with the earlier pairs' losses kept (stacked), then the
classification layer from the teacher's soft labels."""

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
    all_reduce_mean_over_tp,
    depth_issues,
    gather_over_dp,
    hard_loss_claim,
    hidden_tap,
    losses,
    prediction_issues,
    prediction_terms,
    raise_issues,
    teacher_key,
    uniform_map,
)
from gkd_methods_builtin._feature_kd import sequence_index


def phase_pairs(k: int, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(j, m[j])`` for the student layers distilled in phase ``k`` (1-based): ``j = 1 … k`` while
    ``k ≤ S`` (layer j's output and attention imitate teacher layer m[j]'s, ``uniform_map``), none
    once ``k > S`` (the prediction phase)."""
    if k > student_layers:
        return []
    m = uniform_map(teacher_layers, student_layers)
    return [(j, m[j]) for j in range(1, k + 1)]


def scheduled_phase(iteration: int, total: int, student_layers: int) -> int:
    """The phase after optimizer step ``iteration`` (0-based) of ``total`` under ``advance:
    schedule``: ``k`` moves on once ``(iteration + 1)·(S + 1) ≥ k·N``, so the stage is S+1 equal
    phases (several at once when N < S+1)."""
    k, s = 1, student_layers
    while k <= s and (iteration + 1) * (s + 1) >= k * total:
        k += 1
    return k


class SID(Method):
    name = "sid"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher at least as deep as the student; equal widths for the cosine term and equal
        head counts for the attention term; something to optimise in every phase; the cosine term
        on for ``advance: threshold``; teacher logits for the soft term."""
        s = context.student
        issues: list[FeatureIssue] = []
        cos_on, att_on = config["cosine_weight"] > 0, config["attention_weight"] > 0
        if not cos_on and not att_on:
            issues.append(FeatureIssue("student", "cosine_weight", (
                "sid: cosine_weight and attention_weight are both 0, so the layer phases distil nothing; turn one "
                "of them on")))
        elif config["advance"] == "threshold" and not cos_on:
            issues.append(FeatureIssue("student", "advance", (
                "sid: advance: threshold moves to the next layer when the cosine term falls below threshold, but "
                "cosine_weight is 0; set cosine_weight > 0 or advance: schedule")))
        if config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "soft_weight", (
                "sid: soft_weight and hard_weight are both 0, so the last phase (k > S) has no loss; turn one of "
                "them on")))
        for name, t in context.teachers.items():
            label = f"teacher '{name}'"
            issues += depth_issues(cls.name, context, teachers=[name])
            if cos_on and s.hidden_size != t.hidden_size:
                issues.append(FeatureIssue(label, "cosine_weight", (
                    f"sid: the cosine term compares hidden vectors of equal width, but the student has hidden_size "
                    f"{s.hidden_size} and {label} {t.hidden_size}; give the student the teacher's width or set "
                    "cosine_weight: 0")))
            if att_on and s.num_attention_heads != t.num_attention_heads:
                issues.append(FeatureIssue(label, "attention_weight", (
                    f"sid: the attention term compares heads one to one, but the student has {s.num_attention_heads} heads and "
                    f"{label} {t.num_attention_heads}; give the student {t.num_attention_heads} heads or set attention_weight: 0")))
        issues += prediction_issues(cls.name, config, context, fix="or set soft_weight: 0 (hard loss only)")
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))

    def initial_state(self) -> dict[str, Any]:
        return {"k": 1}

    def taps(self, k: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(hidden pairs, attention pairs) of phase ``k`` as (student tap, teacher tap) names."""
        pairs = phase_pairs(k, self.context.student.num_layers, self.teacher_shape.num_layers)
        hidden = [(hidden_tap(j), hidden_tap(t)) for j, t in pairs] if self.config["cosine_weight"] > 0 else []
        attention = ([(f"layers.{j - 1}.attention.scores", f"layers.{t - 1}.attention.scores") for j, t in pairs]
                     if self.config["attention_weight"] > 0 else [])
        return hidden, attention

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        hidden, attention = self.taps(int(state["k"]))
        if hidden or attention:  # a layer phase: only its pairs' features, no prediction term
            return PassPlan({
                STUDENT: ForwardRequest(features=frozenset(s for s, _ in hidden + attention)),
                teacher_key(self.teacher_name): ForwardRequest(
                    features=frozenset(t for _, t in hidden + attention),
                    candidates=frozenset(t for k in range(1, self.context.student.num_layers + 1)
                                         for pairs in self.taps(k) for _, t in pairs)),  # the later phases' (teacher cache)
            })
        models = {STUDENT: ForwardRequest()}
        if self.config["soft_weight"] > 0:  # logits only
            models[teacher_key(self.teacher_name)] = ForwardRequest()
        return PassPlan(models)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        hidden, attention = self.taps(int(state["k"]))
        if not hidden and not attention:
            return prediction_terms(self.name, cfg, outputs, self.teacher_name)
        s_feats, t_feats = outputs.student.features, outputs.teacher(self.teacher_name).features
        mask = outputs.batch["attention_mask"]
        terms: dict[str, torch.Tensor] = {}
        if hidden:
            family = self.context.student.family
            rows = torch.arange(mask.shape[0], device=mask.device)
            idx = sequence_index(mask, family)
            terms["cosine"] = cfg["cosine_weight"] * torch.stack([
                losses.cosine_distance(s_feats[s][rows, idx], t_feats[t][rows, idx]) for s, t in hidden]).sum()
        if attention:
            causal = any(m.family == "decoder" for m in (self.context.student, self.teacher_shape))
            valid = losses.attention_valid_mask(mask, causal=causal)
            per_pair = [losses.attention_kl(losses.masked_log_softmax(s_feats[s], valid),
                                            losses.masked_log_softmax(t_feats[t], valid), valid, log_probs=True)
                        for s, t in attention]
            # Heads are sharded over TP in equal shares: the mean of the ranks' means is the full mean.
            terms["attention"] = cfg["attention_weight"] * all_reduce_mean_over_tp(torch.stack(per_pair).sum())
        return terms

    def after_step(self, step: StepContext, state: dict[str, Any], terms: Mapping[str, float]) -> None:
        s = self.context.student.num_layers
        k = int(state["k"])
        if k > s:
            return
        if self.config["advance"] == "schedule":
            state["k"] = max(k, scheduled_phase(step.iteration, step.total_iterations, s))
            return
        if "cosine" not in terms:
            return
        # Data-parallel ranks see different batches: they decide on the mean of their values, so
        # that every rank stays in the same phase.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        value = float(gather_over_dp(torch.tensor([float(terms["cosine"])], dtype=torch.float64, device=device)).mean())
        if value < self.config["threshold"]:
            state["k"] = k + 1
