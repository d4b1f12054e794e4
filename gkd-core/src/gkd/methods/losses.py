"""Loss primitives shared by methods. Masks *remove* positions from the mean.

The reference implementation multiplied inputs by the mask and still divided by the count of
all positions, so padding diluted every loss (and masked cosine rows counted as distance 1);
here a mask selects the positions that are averaged over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (mask broadcast from the left)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(values)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over every element of the unmasked positions."""
    return _masked_mean((student - teacher.to(student.dtype)) ** 2, mask)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``−Σ softmax(t/τ)·log_softmax(s/τ)`` over the last dim, averaged over positions (no τ²)."""
    target = F.softmax(teacher_logits.float() / temperature, dim=-1)
    per_pos = -(target * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1)
    return _masked_mean(per_pos, mask)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None, scale_by_t2: bool = True) -> torch.Tensor:
    """``τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`` over the last dim, averaged over positions."""
    t_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_pos = (t_log.exp() * (t_log - s_log)).sum(-1)
    loss = _masked_mean(per_pos, mask)
    return loss * temperature**2 if scale_by_t2 else loss


def kl_between_distributions(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                             mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """KL between two tensors that already are probabilities (e.g. attention probs)."""
    t = teacher_probs.float()
    per_pos = (t * (torch.log(t + eps) - torch.log(student_probs.float() + eps))).sum(-1)
    return _masked_mean(per_pos, mask)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 − cos`` along the last dim, averaged over unmasked positions."""
    per_pos = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return _masked_mean(per_pos, mask)


def task_loss_per_example(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy per example: classification ``[b, C]`` or token-level ``[b, s, V]`` (mean over labelled tokens)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    per_tok = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=ignore_index)
    valid = (labels != ignore_index).float()
    return (per_tok * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)
