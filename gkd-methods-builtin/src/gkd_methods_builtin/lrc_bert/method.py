"""LRC-BERT (Fu et al., 2021): contrastive distillation of the intermediate layers (COS-NCE over
in-batch negatives, through a learned projection), with gradient perturbation of the embeddings."""

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
    ModelView,
    PassPlan,
    PassView,
    StepContext,
    add_perturbation,
    depth_issues,
    gather_over_dp,
    hard_loss_claim,
    hidden_tap,
    prediction_issues,
    prediction_terms,
    raise_issues,
    teacher_key,
    uniform_map,
)


def cos_nce(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, teacher_all: torch.Tensor | None = None,
            mask_all: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example COS-NCE ``l_i = 1 − Σ_{j≠i} g_ij / (2(B−1)) + g_ii``, ``[b]``.

    ``g_ij = 1 − mean cos(s_i^{l,p}, t_j^{l,p})`` over the layers l and the positions p real in both
    examples i and j: the angular distance of student example i to teacher example j.

    Args:
        student: ``[b, layers, s, h]``, the projected student hidden states of this rank.
        teacher: ``[b, layers, s, h]``, the teacher's, same examples (the positives).
        mask: ``[b, s]``, 1 = real token.
        teacher_all, mask_all: The candidates j (negatives and, once each, the positives): every
            data-parallel rank's teacher rows ``[B, layers, s', h]`` with ``s' ≥ s`` and their
            masks ``[B, s']``; default ``teacher`` and ``mask`` (B = b).
    """
    layers, s = student.shape[1], student.shape[2]
    keep = mask.to(torch.float32)
    s_hat = F.normalize(student.float(), dim=-1) * keep[:, None, :, None]
    t_hat = F.normalize(teacher.float(), dim=-1) * keep[:, None, :, None]
    # Positives: g_ii over example i's real tokens.
    g_pos = 1 - (s_hat * t_hat).sum((1, 2, 3)) / (layers * keep.sum(-1)).clamp_min(1.0)
    if teacher_all is None or mask_all is None:
        t_all, keep_all = t_hat, keep
    else:  # positions beyond this rank's length hold only student padding: they never count
        keep_all = mask_all[:, :s].to(torch.float32)
        t_all = F.normalize(teacher_all[:, :, :s].float(), dim=-1) * keep_all[:, None, :, None]
    # g_ij for every candidate j, as one matmul: masked positions are zero on both sides.
    dots = s_hat.flatten(1) @ t_all.flatten(1).T  # [b, B]
    g = 1 - dots / (layers * (keep @ keep_all.T)).clamp_min(1.0)
    negatives = g.sum(-1) - g_pos  # the diagonal (each example's own teacher row) subtracted once
    return 1 - negatives / (2 * max(g.shape[1] - 1, 1)) + g_pos


class LRCBERT(Method):
    name = "lrc-bert"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher at least as deep as the student; at least one term on; teacher logits for
        the soft term."""
        issues: list[FeatureIssue] = []
        if config["alpha"] <= 0 and config["soft_weight"] <= 0 and config["hard_weight"] <= 0:
            issues.append(FeatureIssue("student", "alpha", (
                "lrc-bert: alpha, soft_weight and hard_weight are all 0, so nothing is optimised; set alpha > 0 "
                "(contrastive), soft_weight > 0 or hard_weight > 0")))
        if config["alpha"] > 0:
            issues += depth_issues(cls.name, context, fix=", or set alpha: 0")
        issues += prediction_issues(cls.name, config, context, fix="or set soft_weight: 0")
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        s, t = context.student, self.teacher_shape
        # W: one bias-free projection of every student layer into the teacher's width.
        self.proj = nn.Linear(s.hidden_size, t.hidden_size, bias=False)
        if self.config["alpha"] > 0:
            m = uniform_map(t.num_layers, s.num_layers)
            self.student_taps = [hidden_tap(j) for j in range(1, s.num_layers + 1)]
            self.teacher_taps = [hidden_tap(m[j]) for j in range(1, s.num_layers + 1)]
        else:
            self.student_taps, self.teacher_taps = [], []
        self._needs_teacher = self.config["alpha"] > 0 or self.config["soft_weight"] > 0
        # Pass 0's teacher results, kept for pass 1 within one step (never across steps:
        # checkpoints are taken between steps). A plain dict: not a buffer, never saved.
        self._probe: dict[str, Any] = {}

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        perturb = self.config["perturb"]
        if pass_index == 0:
            student = set(self.student_taps) | ({"embeddings"} if perturb else set())
            models = {STUDENT: ForwardRequest(features=frozenset(student))}
            if self._needs_teacher:
                models[teacher_key(self.teacher_name)] = ForwardRequest(features=frozenset(self.teacher_taps))
            # With perturbation, pass 0 is a probe: its terms give the gradient, they are not optimised.
            return PassPlan(models, contributes_to_loss=not perturb)
        if pass_index > 1 or not perturb or previous is None:
            return None
        delta = self.perturbation(previous)
        return PassPlan({STUDENT: ForwardRequest(features=frozenset(self.student_taps),
                                                 operations={"embeddings": add_perturbation(delta)})})

    def perturbation(self, probe: PassView) -> torch.Tensor:
        """``ε·g/‖g‖₂`` with ``g`` the gradient of the probe pass's terms with respect to the student's
        embedding output (zero when g is not finite or not defined)."""
        embeddings = probe.student.features["embeddings"]
        total = sum(probe.terms.values(), start=torch.zeros((), device=embeddings.device))
        if not total.requires_grad:
            return torch.zeros_like(embeddings)
        # autograd.grad leaves every .grad untouched (gradient accumulation keeps working); the graph
        # is kept because other methods of the stage may backpropagate through the same forward.
        (g,) = torch.autograd.grad(total, embeddings, retain_graph=True, allow_unused=True)
        if g is None or not bool(torch.isfinite(g).all()):
            return torch.zeros_like(embeddings)
        g = g.float()
        if self.config["perturb_norm"] == "example":
            norm = g.flatten(1).norm(dim=-1).reshape(-1, *([1] * (g.dim() - 1)))
        else:
            norm = g.norm()
        return (self.config["epsilon"] * g / norm.clamp_min(1e-12)).to(embeddings.dtype)

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        key = teacher_key(self.teacher_name)
        if pass_index == 0:
            teacher = outputs.models.get(key)
            probe: dict[str, Any] = {"teacher": teacher}
            if cfg["alpha"] > 0 and teacher is not None:
                probe |= self._teacher_candidates(teacher, outputs.batch["attention_mask"])
            if cfg["perturb"]:
                self._probe = probe
        else:  # the perturbed pass: the teacher's input is unchanged, so its pass-0 results stand
            probe, self._probe = self._probe, {}
            if probe.get("teacher") is not None:
                outputs = PassView(outputs.batch, {**outputs.models, key: probe["teacher"]})
        terms: dict[str, torch.Tensor] = {}
        if cfg["alpha"] > 0:
            mask = outputs.batch["attention_mask"]
            student = torch.stack([self.proj(outputs.student.features[t]) for t in self.student_taps], 1)
            per_example = cos_nce(student, probe["local"], mask, probe.get("all"), probe.get("all_mask"))
            terms["contrastive"] = cfg["alpha"] * len(self.student_taps) * per_example.mean()
        terms |= prediction_terms(self.name, cfg, outputs, self.teacher_name)
        return terms

    def _teacher_candidates(self, teacher: ModelView, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's teacher layers ``[b, layers, s, h]`` and, with ``gather_dp``, every data-parallel
        rank's (padded to the longest sequence) with their masks."""
        local = torch.stack([teacher.features[t] for t in self.teacher_taps], 1).detach().float()
        out = {"local": local}
        if self.config["gather_dp"]:
            lengths = gather_over_dp(torch.tensor([local.shape[2]], device=local.device))
            longest = int(lengths.max())
            if lengths.numel() > 1:  # more than one data-parallel rank
                pad = longest - local.shape[2]
                out["all"] = gather_over_dp(F.pad(local, (0, 0, 0, pad)))
                out["all_mask"] = gather_over_dp(F.pad(mask, (0, pad)))
        return out
