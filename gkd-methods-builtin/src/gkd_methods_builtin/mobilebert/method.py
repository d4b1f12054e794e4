"""MobileBERT (Sun et al., 2020): progressive knowledge transfer, one layer pair per phase
(feature-map transfer: hidden-state MSE; attention transfer: per-head KL of the attention
distributions), then pre-training distillation (MLM loss + KD on the MLM logits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    hard_loss_claim,
    hidden_tap,
    logits_issues,
    losses,
    raise_issues,
    teacher_key,
    teacher_logits,
    uniform_map,
)


@dataclass(frozen=True)
class Pair:
    """One student/teacher feature pair of a phase and the factor of its loss."""

    student: str
    teacher: str
    weight: float


def detach(value: torch.Tensor) -> torch.Tensor:
    """The freeze operation: the same values, cut from the graph below this point."""
    return value.detach()


def labelled_mask(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Positions the soft term averages over: token logits — the real tokens that carry a label
    (the masked tokens of masked_lm, the next-token positions of causal_lm; every real token
    when the labels are per example); class logits — every example (``None``)."""
    if logits.dim() != 3:
        return None
    keep = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        keep = keep & (labels != -100)
    return keep


def is_causal(context: MethodContext) -> bool:
    """Causal attention masks when any model is a decoder."""
    return any(m.family == "decoder" for m in (context.student, *context.teachers.values()))


class MobileBERT(Method):
    name = "mobilebert"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Equal hidden sizes (hidden MSE without projection), equal head counts (per-head KL), a
        teacher at least as deep as the student, a loss in every phase, logits for the soft term."""
        s = context.student
        issues: list[FeatureIssue] = []
        if config["hidden_weight"] <= 0 and config["attention_weight"] <= 0:
            issues.append(FeatureIssue("student", "hidden_weight", (
                "mobilebert: hidden_weight and attention_weight are both 0, so the layer phases (k ≤ S) have no "
                "loss; turn one of them on")))
        if config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "hard_weight", (
                "mobilebert: soft_weight and hard_weight are both 0, so the pre-training distillation phase (k > S) "
                "has no loss; turn one of them on")))
        for name, t in context.teachers.items():
            label = f"teacher '{name}'"
            issues += depth_issues(cls.name, context, mapping="maps every student layer onto a block of teacher layers",
                                   teachers=[name])
            if config["hidden_weight"] > 0 and t.hidden_size != s.hidden_size:
                issues.append(FeatureIssue(label, "hidden_weight", (
                    f"mobilebert: feature-map transfer compares hidden states without a projection, but the student "
                    f"has hidden_size {s.hidden_size} and {label} {t.hidden_size}; give the student the teacher's "
                    f"width (MobileBERT keeps the residual stream equal) or set hidden_weight: 0")))
            if config["attention_weight"] > 0 and t.num_attention_heads != s.num_attention_heads:
                issues.append(FeatureIssue(label, "attention_weight", (
                    f"mobilebert: attention transfer compares heads one to one, but the student has {s.num_attention_heads} "
                    f"heads and {label} {t.num_attention_heads}; give the student {t.num_attention_heads} heads or set "
                    f"attention_weight: 0")))
        if config["soft_weight"] > 0:
            issues += logits_issues(cls.name, context, field="soft_weight", fix="or set soft_weight: 0")
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        self.num_layers = context.student.num_layers
        self.teacher_map = uniform_map(self.teacher_shape.num_layers, self.num_layers)

    def initial_state(self) -> dict[str, Any]:
        return {"k": 1}

    # ------------------------------------------------------------------ phases

    def pairs(self, k: int) -> tuple[list[Pair], list[Pair]]:
        """(hidden pairs, attention pairs) active in phase ``k`` (none once k > S).

        Hidden pair j is student ``hidden_tap(j)`` ↔ teacher ``hidden_tap(m[j])``; attention pair j
        is student layer j ↔ the last teacher layer of block j. Phase k trains student layer k−1:
        its newest pairs are hidden pair k and attention pair k−1. ``freeze``: those alone;
        ``down_weight``: also hidden pairs 0…k−1 and attention pairs 0…k−2, scaled by
        ``earlier_weight`` (left out when it is 0).
        """
        cfg, m = self.config, self.teacher_map
        if k > self.num_layers:
            return [], []
        freeze = cfg["lower_layers"] == "freeze"
        earlier = 0.0 if freeze else cfg["earlier_weight"]

        def chosen(newest: int) -> list[tuple[int, float]]:
            out = [] if earlier <= 0 else [(j, earlier) for j in range(newest)]
            return [*out, (newest, 1.0)]

        hidden = [Pair(hidden_tap(j), hidden_tap(m[j]), w) for j, w in chosen(k)] if cfg["hidden_weight"] > 0 else []
        attention = ([Pair(f"layers.{j}.attention.scores", f"layers.{m[j + 1] - 1}.attention.scores", w)
                      for j, w in chosen(k - 1)] if cfg["attention_weight"] > 0 else [])
        return hidden, attention

    def phase_over(self, k: int, done: int, total_iterations: int) -> bool:
        """Whether phase ``k`` is over after ``done`` optimizer steps: ``done ≥ k·N/(S+1)``
        (compared in integers), or ``done ≥ k·steps_per_phase``."""
        if self.config["steps_per_phase"] is not None:
            return done >= k * self.config["steps_per_phase"]
        return done * (self.num_layers + 1) >= k * total_iterations

    # ------------------------------------------------------------------ step

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        k = int(state["k"])
        teacher = teacher_key(self.teacher_name)
        if k > self.num_layers:  # pre-training distillation: logits only
            models = {STUDENT: ForwardRequest()}
            if self.config["soft_weight"] > 0:
                models[teacher] = ForwardRequest()
            return PassPlan(models)
        hidden, attention = self.pairs(k)
        operations = {f"layers.{k - 1}.input": detach} if self.config["lower_layers"] == "freeze" else {}
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset(p.student for p in hidden + attention), operations=operations),
            teacher: ForwardRequest(features=frozenset(p.teacher for p in hidden + attention),
                                    candidates=self._all_teacher_taps()),
        })

    def _all_teacher_taps(self) -> frozenset[str]:
        """What the later phases read from the teacher (a teacher cache records it in the first)."""
        return frozenset(p.teacher for k in range(1, self.num_layers + 1) for pairs in self.pairs(k) for p in pairs)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg, k = self.config, int(state["k"])
        s_out = outputs.student
        terms: dict[str, torch.Tensor] = {}
        if k > self.num_layers:
            if cfg["soft_weight"] > 0:
                z, zt = s_out.logits, teacher_logits(outputs, self.teacher_name, self.name)
                terms["soft"] = cfg["soft_weight"] * losses.kl_divergence(z, zt, cfg["temperature"],
                                                                          labelled_mask(z, outputs.batch))
            if cfg["hard_weight"] > 0 and s_out.task_loss is not None:
                terms["hard"] = cfg["hard_weight"] * s_out.task_loss
            return terms
        hidden, attention = self.pairs(k)
        s_feats, t_feats = s_out.features, outputs.teacher(self.teacher_name).features
        mask = outputs.batch["attention_mask"]
        if hidden:
            terms["hidden"] = cfg["kd_weight"] * cfg["hidden_weight"] * sum(
                (p.weight * losses.mse(s_feats[p.student].float(), t_feats[p.teacher].float(), mask) for p in hidden),
                start=torch.zeros((), device=mask.device))
        if attention:
            valid = losses.attention_valid_mask(mask, causal=is_causal(self.context))
            total = torch.zeros((), device=mask.device)
            for p in attention:
                s_log = losses.masked_log_softmax(s_feats[p.student], valid)
                t_log = losses.masked_log_softmax(t_feats[p.teacher], valid)
                # Per head on this rank's heads (complete key axis), then the mean over ranks.
                total = total + p.weight * all_reduce_mean_over_tp(losses.attention_kl(s_log, t_log, valid, log_probs=True))
            terms["attention"] = cfg["kd_weight"] * cfg["attention_weight"] * total
        return terms

    def after_step(self, step: StepContext, state: dict[str, Any], terms: Mapping[str, float]) -> None:
        """Advance k past every phase that ends by this step: ``iteration + 1 ≥ k·N/(S+1)``
        (or ``k·steps_per_phase``); k stops at S + 1."""
        k, done = int(state["k"]), step.iteration + 1
        while k <= self.num_layers and self.phase_over(k, done, step.total_iterations):
            k += 1
        state["k"] = k
