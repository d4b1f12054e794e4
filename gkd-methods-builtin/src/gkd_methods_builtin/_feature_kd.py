"""Private helpers shared by the built-in methods ``alp-kd``, ``universal-kd`` and ``ckd``.

Not an API: another distribution must not import it (methods depend on :mod:`gkd.methods`
only). It holds what the three methods have in common — picking the per-example vector of a
hidden state, attention over a stack of teacher layers — so that the three behave alike.
Their soft/hard prediction terms are KD's (:func:`gkd.methods.prediction_terms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
