"""Private helpers shared by the built-in methods ``alp-kd``, ``universal-kd`` and ``ckd``.

Not an API: another distribution must not import it (methods depend on :mod:`gkd.methods`
only). It holds what the three methods have in common — picking the per-example vector of a
hidden state, attention over a stack of teacher layers, and the soft/hard prediction terms
that the reference adds to every method (``pre_loss``) — so that the three behave alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gkd.methods import FeatureIssue, MethodContext, PassView, logits_issues, losses, teacher_logits


def sequence_index(attention_mask: torch.Tensor, family: str) -> torch.Tensor:
    """``[b]``: the position that stands for the whole sequence.

    Encoders: the first real token (token 0, ``[CLS]``, with right padding). Decoders: the last
    real token, the only position whose causal attention sees every token of the example
    (token 0 of a decoder has seen only itself).
    """
    keep = attention_mask.bool()
    if family == "decoder":
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        return torch.where(keep, positions, -1).amax(-1).clamp_min(0)
    return keep.int().argmax(-1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str, family: str) -> torch.Tensor:
    """The vectors a layer-attention loss compares.

    Args:
        hidden: ``[b, s, h]``.
        attention_mask: ``[b, s]``, 1 = real token.
        how: ``"cls"`` — ``[b, h]`` at :func:`sequence_index`; ``"mean"`` — ``[b, h]``, the mean
            over real tokens; ``"tokens"`` — ``[b, s, h]`` unchanged (mask the loss with
            ``attention_mask``).
        family: ``"encoder"`` or ``"decoder"``.
    """
    if how == "tokens":
        return hidden
    if how == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "cls":
        idx = sequence_index(attention_mask, family)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {how!r}; use 'cls', 'mean' or 'tokens'")


def attend_over_layers(student: torch.Tensor, teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """ALP-KD's attention-based layer projection: ``c = Σ_j softmax_j(s·t_j)·t_j``.

    Args:
        student: ``[..., h]``, one student layer's vectors.
        teachers: The teacher layers' vectors, each ``[..., h]`` (same leading dimensions).

    Returns:
        ``[..., h]``: per vector, the teacher layers combined with weights from the raw dot
        product of the student vector with each teacher vector (no scaling, as in the paper).
    """
    stack = torch.stack([t.to(student.dtype) for t in teachers], dim=-2)  # [..., L, h]
    weights = torch.softmax((stack * student.unsqueeze(-2)).sum(-1), dim=-1)  # [..., L]
    return (weights.unsqueeze(-1) * stack).sum(-2)


def prediction_issues(name: str, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
    """The logits rules of the soft term (only when ``soft_weight > 0``)."""
    if config["soft_weight"] <= 0:
        return []
    return logits_issues(name, context, field="soft_weight", fix="or set soft_weight: 0")


def hard_loss_claim(config: Mapping[str, Any]) -> dict[str, str]:
    """:meth:`Method.exclusive` of a method whose ``hard_weight`` adds the gold-label term."""
    return {"hard_loss": "hard_weight"} if config["hard_weight"] > 0 else {}


def prediction_terms(name: str, config: Mapping[str, Any], outputs: PassView, teacher: str) -> dict[str, torch.Tensor]:
    """``soft`` (``soft_weight``·soft loss at ``temperature``) and ``hard`` (``hard_weight``·task loss)."""
    terms: dict[str, torch.Tensor] = {}
    student = outputs.student
    if config["soft_weight"] > 0:
        t_logits = teacher_logits(outputs, teacher, name)
        mask = losses.logits_mask(student.logits, outputs.batch.get("attention_mask"))
        terms["soft"] = config["soft_weight"] * losses.soft_loss(config["soft_loss"], student.logits, t_logits,
                                                                 config["temperature"], mask)
    if config["hard_weight"] > 0 and student.task_loss is not None:
        terms["hard"] = config["hard_weight"] * student.task_loss
    return terms
