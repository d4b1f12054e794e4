"""Structural relations of MGSKD, with padding (or empty spans) excluded from every relation.

Memory of the triplet relations is bounded by construction: token and span angles are taken
only at ``k1`` anchors × ``k2`` neighbours chosen from the teacher's relation attention, and the
neighbour vectors are gathered *before* differences are formed, so a layer needs
``O(b·k1·k2·d + b·k1·k2²)`` memory whatever the sequence length (the naive anchor-to-every-token
difference tensor is ``O(b·k1·s·d)``). Sample angles cover every triplet of the batch:
``O(b²·d + heads·b³)``, which the micro-batch size bounds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pair_relations(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot products per relation head: ``[b, n, d]`` → ``[b, heads, n, n]``."""
    b, n, d = x.shape
    xh = x.float().view(b, n, heads, d // heads).transpose(1, 2)
    return xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)


def masked_smooth_l1(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (β = 1) averaged over the ``valid`` entries (0 when there are none)."""
    v = valid.expand_as(student)
    per = F.smooth_l1_loss(student, teacher, reduction="none")
    return torch.where(v, per, torch.zeros((), device=per.device)).sum() / v.sum().clamp_min(1)


def select_triplets(teacher_pairs: torch.Tensor, keep: torch.Tensor, k1: int,
                    k2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """MGSKD's hierarchical sampling, from the teacher's pair relations ``[b, heads, n, n]``.

    The softmax of each real position's relations over the real positions is its relation
    attention. Anchors are the ``k1`` positions receiving the most attention (summed over heads
    and real queries); each anchor's neighbours are the ``k2`` other real positions it attends
    most. Returns ``(anchors [b, k1], neighbours [b, k1, k2], valid [b, k1, k2, k2])`` — valid
    triplets have a real anchor and two distinct real neighbours — or ``None`` when no triplet
    can exist (fewer than three positions).
    """
    b, _, n, _ = teacher_pairs.shape
    if n < 3:
        return None
    pair_ok = keep[:, None, :, None] & keep[:, None, None, :]
    scores = teacher_pairs.float().masked_fill(~pair_ok, torch.finfo(torch.float32).min)
    attention = torch.softmax(scores, -1) * pair_ok  # padded queries and keys contribute nothing
    importance = attention.sum((1, 2)).masked_fill(~keep, -math.inf)
    k1 = min(k1, n)
    anchors = importance.topk(k1, -1).indices
    local = attention.sum(1).gather(1, anchors[..., None].expand(b, k1, n))
    candidate = keep[:, None, :] & (anchors[..., None] != torch.arange(n, device=keep.device))
    k2 = min(k2, n - 1)
    neighbours = local.masked_fill(~candidate, -math.inf).topk(k2, -1).indices
    anchor_ok, neighbour_ok = keep.gather(1, anchors), candidate.gather(-1, neighbours)
    distinct = ~torch.eye(k2, dtype=torch.bool, device=keep.device)
    valid = anchor_ok[:, :, None, None] & neighbour_ok[..., :, None] & neighbour_ok[..., None, :] & distinct
    return anchors, neighbours, valid


def triplet_angles(x: torch.Tensor, anchors: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``cos∠(j, anchor, k)`` for the chosen neighbours: ``[b, n, d]`` → ``[b, k1, k2, k2]``."""
    b, _, d = x.shape
    k1, k2 = neighbours.shape[1:]
    x = x.float()
    at_anchor = x.gather(1, anchors[..., None].expand(b, k1, d))
    near = x.gather(1, neighbours.reshape(b, k1 * k2, 1).expand(b, k1 * k2, d)).view(b, k1, k2, d)
    unit = F.normalize(near - at_anchor[:, :, None], dim=-1)
    return unit @ unit.transpose(-1, -2)


def token_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, heads: int, k1: int,
               k2: int) -> torch.Tensor:
    """Token (or span) level: MSE of the pair relations over real pairs of every head, plus
    smooth-L1 of the triplet angles at the teacher-chosen triplets. ``[b, n, d]`` inputs."""
    s_pairs, t_pairs = pair_relations(student, heads), pair_relations(teacher, heads)
    pair_ok = (keep[:, None, :, None] & keep[:, None, None, :]).expand_as(s_pairs)
    diff = torch.where(pair_ok, s_pairs - t_pairs, torch.zeros((), device=s_pairs.device))
    loss = (diff**2).sum() / pair_ok.sum().clamp_min(1)
    chosen = select_triplets(t_pairs, keep, k1, k2)
    if chosen is not None:
        anchors, neighbours, valid = chosen
        loss = loss + masked_smooth_l1(triplet_angles(student, anchors, neighbours),
                                       triplet_angles(teacher, anchors, neighbours), valid)
    return loss


def sample_angles(pooled: torch.Tensor, heads: int) -> torch.Tensor:
    """``cos∠(x_j, x_i, x_k)`` per relation head between examples: ``[b, d]`` → ``[heads, b, b, b]``
    (vertex ``i`` on dim 1)."""
    b, d = pooled.shape
    xh = pooled.float().view(b, heads, d // heads).transpose(0, 1)
    unit = F.normalize(xh[:, None] - xh[:, :, None], dim=-1)  # [heads, i, j] = x_j − x_i
    return unit @ unit.transpose(-1, -2)


def sample_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int) -> torch.Tensor:
    """Sample level: smooth-L1 of the angles over triplets of three distinct examples
    (0 for a batch of fewer than three). ``[b, d]`` pooled inputs."""
    b = student.shape[0]
    other = ~torch.eye(b, dtype=torch.bool, device=student.device)
    distinct = other[:, :, None] & other[:, None, :] & other[None, :, :]
    return masked_smooth_l1(sample_angles(student, heads), sample_angles(teacher, heads), distinct)


def draw_spans(attention_mask: torch.Tensor, rate: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous spans partitioning each example's real tokens.

    Example ``e`` with ``L`` real tokens gets ``max(1, ⌊rate·L⌋)`` spans whose lengths are
    proportional to ``|N(0, 1)|`` draws (each at least one token), as in the reference, but
    drawn per example over its real tokens only (padding never joins a span).

    Returns:
        ``assign`` ``[b, n, s]`` bool (token ``t`` belongs to span ``p``) and ``spans`` ``[b, n]``
        bool (span ``p`` exists), ``n`` the largest span count of the batch.
    """
    keep = attention_mask.bool()
    device = keep.device
    lengths = keep.sum(1)
    counts = (lengths.float() * rate).floor().long().clamp_min(1).minimum(lengths.clamp_min(1))
    n = int(counts.max())
    idx = torch.arange(n, device=device)
    used = idx[None, :] < counts[:, None]
    weights = torch.randn(keep.shape[0], n, generator=generator).abs().to(device, torch.float64) * used
    extra = (lengths - counts).clamp_min(0)
    share = weights.cumsum(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)
    cum = torch.floor(share * extra[:, None]).long()
    cum = torch.where(idx[None, :] >= counts[:, None] - 1, extra[:, None], cum)  # exact last end
    ends = cum + idx[None, :] + 1  # exclusive end of each span, counted in real tokens
    rank = keep.long().cumsum(1) - 1  # position of each real token among the real ones
    span_of = (ends[:, None, :] <= rank[:, :, None]).sum(-1)  # [b, s]
    assign = (span_of[:, None, :] == idx[None, :, None]) & keep[:, None, :] & used[:, :, None]
    return assign, assign.any(-1)


def span_means(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Mean of the tokens of every span: ``[b, s, d]`` with ``assign`` ``[b, n, s]`` → ``[b, n, d]``."""
    a = assign.float()
    return (a @ x.float()) / a.sum(-1, keepdim=True).clamp_min(1.0)
