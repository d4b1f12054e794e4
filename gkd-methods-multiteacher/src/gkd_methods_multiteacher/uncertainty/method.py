"""Uncertainty-based teacher selection (Li et al., 2021, "Dynamic Knowledge Distillation"): the
student's normalised prediction entropy routes each example to one teacher (hard) or weights
every teacher per example (soft).

With ``skip_idle_teachers`` (the default) a step has two forward passes. Which teacher an
example goes to is only known once the student has run, and a plan is made before its pass
runs, so pass 0 runs the student alone (its ``hard`` term) and pass 1 runs only the teachers
that got examples (the ``soft`` term, logged ``pass1.soft``). The student is not run again: the
pass-1 loss reads its pass-0 logits, whose graph lives until the step's backward (pass 0
contributes to the loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

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
    logits_issues,
    losses,
    raise_issues,
    teacher_key,
    teacher_logits,
)


def normalized_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``u_b = H(softmax z_b) / log C`` in [0, 1], ``[b]``, detached.

    Class logits ``[b, C]``: one value per example. Token logits ``[b, s, V]``: the mean of the
    per-token value over the example's real tokens (``attention_mask``; every token when
    ``None``), so padding never counts.
    """
    z = logits.detach().float()
    classes = z.shape[-1]
    if classes < 2:
        return z.new_zeros(z.shape[:1])
    log_p = F.log_softmax(z, dim=-1)
    h = -(log_p.exp() * log_p).sum(-1) / math.log(classes)
    if h.dim() == 1:
        return h
    if attention_mask is None:
        return h.mean(-1)
    m = attention_mask.to(h.dtype)
    return (h * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def hard_groups(uncertainty: torch.Tensor, n: int) -> torch.Tensor:
    """The group (0…n−1) of every example, ``[b]``: examples sorted by decreasing uncertainty
    (a stable sort: ties keep batch order), rank r (0 = most uncertain) in group
    ``⌈(r+1)·n/B⌉ − 1`` — n equal rank quantiles, sizes differing by at most one (later groups
    larger). With B < n some groups stay empty."""
    b = uncertainty.shape[0]
    order = torch.sort(uncertainty, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b, device=order.device)
    return ((rank + 1) * n + b - 1) // b - 1


def hard_weights(uncertainty: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, n]``: n for the example's group, 0 elsewhere (each row sums to n, as the soft weights)."""
    return n * F.one_hot(hard_groups(uncertainty, n), n).to(uncertainty.dtype)


def soft_weights(uncertainty: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, n]``: ``w_{b,j} = u_b + (1 − 2u_b)·j/(n − 1)``, renormalised so that each row sums to n
    (teacher j = 0 gets u_b, the last one 1 − u_b, before the renormalisation)."""
    u = uncertainty.unsqueeze(-1)
    j = torch.arange(n, device=u.device, dtype=u.dtype) / (n - 1)
    w = u + (1 - 2 * u) * j
    return n * w / w.sum(-1, keepdim=True)


class Uncertainty(Method):
    name = "uncertainty"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """``teacher_order`` names the entry's teachers, each once; logits of equal width for the
        soft term; some term switched on."""
        issues: list[FeatureIssue] = []
        names, order = context.teacher_names, config["teacher_order"]
        if order is not None and sorted(order) != sorted(names):
            issues.append(FeatureIssue("student", "teacher_order", (
                f"{cls.name}: teacher_order must list the entry's teachers {names} each once, but it is {list(order)}; "
                "fix the list or drop it (null: the entry's order)")))
        if config["soft_weight"] > 0:
            issues += logits_issues(cls.name, context, field="soft_weight", fix="or set soft_weight: 0 (no soft term)")
        if config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "soft_weight", (
                f"{cls.name}: soft_weight and hard_weight are both 0, so the method adds no loss; give one of them a "
                "positive weight")))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        self.order: list[str] = list(self.config["teacher_order"] or context.teacher_names)
        # Pass-0 student logits and the weights for pass 1 of the current step. Transient: set by
        # plan(pass 1), consumed by loss(pass 1); checkpoints are taken between steps, never within one.
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def weights(self, logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``[b, n]`` per-example teacher weights (columns in ``teacher_order``), each row summing to n."""
        u = normalized_entropy(logits, attention_mask)
        n = len(self.order)
        if self.config["assign"] == "soft":
            return soft_weights(u, n)
        if u.shape[0] < n and self.config["small_batch"] == "error":
            raise GkdError(
                f"{self.name}: assign: hard splits every micro-batch into one group per teacher, but this rank's "
                f"micro-batch has {u.shape[0]} example(s) and there are {n} teachers; use a per-rank batch of at least "
                f"{n} (training.batch_size; a smaller last batch of an epoch counts too), set small_batch: route "
                "(teachers without examples are skipped) or assign: soft")
        return hard_weights(u, n)

    def _soft_runs(self) -> bool:
        return self.config["soft_weight"] > 0

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        two_passes = self.config["skip_idle_teachers"]
        if pass_index == 0:
            self._pending = None
            models = {STUDENT: ForwardRequest()}
            if self._soft_runs() and not two_passes:
                models.update({teacher_key(t): ForwardRequest() for t in self.order})
            return PassPlan(models)
        if pass_index > 1 or not two_passes or not self._soft_runs() or previous is None:
            return None
        z = previous.student.logits
        w = self.weights(z, previous.batch.get("attention_mask"))
        self._pending = (z, w)
        # every row sums to n > 0, so at least one teacher has an example
        return PassPlan({teacher_key(t): ForwardRequest() for j, t in enumerate(self.order) if bool(w[:, j].any())})

    def soft(self, logits: torch.Tensor, weights: torch.Tensor, outputs: PassView, teachers: Sequence[str]) -> torch.Tensor:
        """``mean_i mean_b(w_{b,i}·L_{b,i})`` over the n teachers of ``teacher_order``; a teacher
        left out of ``teachers`` has weight 0 for every example and adds nothing."""
        cfg = self.config
        mask = losses.logits_mask(logits, outputs.batch.get("attention_mask"))
        total = logits.new_zeros((), dtype=torch.float32)
        for name in teachers:
            per_example = losses.soft_loss_per_example(cfg["soft_loss"], logits, teacher_logits(outputs, name, self.name),
                                                       cfg["temperature"], mask)
            total = total + (weights[:, self.order.index(name)] * per_example).mean()
        return total / len(self.order)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if pass_index > 0:
            if self._pending is None:
                raise RuntimeError(f"{self.name}: loss of pass {pass_index} without the routing of plan(pass 1)")
            logits, w = self._pending
            self._pending = None
            ran = [t for t in self.order if teacher_key(t) in outputs.models]
            terms["soft"] = cfg["soft_weight"] * self.soft(logits, w, outputs, ran)
            return terms
        student = outputs.student
        if cfg["hard_weight"] > 0 and student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * student.task_loss
        if self._soft_runs() and not cfg["skip_idle_teachers"]:
            w = self.weights(student.logits, outputs.batch.get("attention_mask"))
            terms["soft"] = cfg["soft_weight"] * self.soft(student.logits, w, outputs, self.order)
        return terms
