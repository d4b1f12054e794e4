"""The four relation losses of CKD on stacks of hidden states ``[b, L, s, d]`` (L layers).

Every loss compares statistics computed *within* each model, so student and teacher widths may
differ. Masks: ``keep`` ``[b, s]`` marks real tokens; relations involve real tokens only, and
each loss divides by the number of tokens that have at least one relation (never by padding).
Angles are computed from Gram matrices (``(r_j − r_i)·(r_k − r_i) = G_jk − G_ij − G_ik + G_ii``),
so no ``[s, window, d]`` tensor of difference vectors is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gkd.methods import losses

_FILL = -1e4
"""Logit of excluded relations (cosines lie in [-1, 1]): zero probability, finite arithmetic."""
_EPS = 1e-12


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, ``KL(softmax(teacher) ‖ softmax(student))`` over the ``valid`` entries of the last dim."""
    s_log = torch.log_softmax(torch.where(valid, student, _FILL), dim=-1)
    t_log = torch.log_softmax(torch.where(valid, teacher, _FILL), dim=-1)
    return torch.where(valid, t_log.exp() * (t_log - s_log), 0.0).sum(-1)


def _cosines(x: torch.Tensor) -> torch.Tensor:
    """``[..., n, d]`` → ``[..., n, n]`` cosine similarities."""
    u = F.normalize(x, dim=-1, eps=_EPS)
    return u @ u.transpose(-1, -2)


def _pair_mask(keep: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[b, s, s]``: (i, j) both real, ``j ≠ i``, and for decoders ``j < i``."""
    s = keep.shape[1]
    return losses.attention_valid_mask(keep, causal=causal)[:, 0] & ~torch.eye(s, dtype=torch.bool, device=keep.device)


def word_relation_distance(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor,
                           causal: bool = False) -> torch.Tensor:
    """WR-Dist: per layer and token i, the distribution ``softmax_j cos(r_i, r_j)`` over the other
    real tokens j (decoders: the preceding ones); ``KL(teacher ‖ student)`` summed over layers,
    averaged over the tokens that have at least one j."""
    pair = _pair_mask(keep, causal)
    rows = pair.any(-1)
    per_row = _kl_rows(_cosines(student.float()), _cosines(teacher.float()), pair[:, None])  # [b, L, s]
    return (per_row * rows[:, None]).sum() / rows.sum().clamp_min(1)


def _window(keep: torch.Tensor, window_size: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour positions ``[s, W]`` of each token (clamped into range) and ``[b, s, W]`` whether
    each is a real token within the sequence."""
    s, half = keep.shape[1], window_size // 2
    offsets = torch.arange(-half, 1 if causal else half + 1, device=keep.device)
    offsets = offsets[offsets != 0]
    nb = torch.arange(s, device=keep.device)[:, None] + offsets[None, :]
    inside = (nb >= 0) & (nb < s)
    nb = nb.clamp(0, s - 1)
    return nb, keep[:, nb] & inside[None]


def _window_angles(x: torch.Tensor, keep: torch.Tensor, nb: torch.Tensor, nb_ok: torch.Tensor) -> torch.Tensor:
    """``[b, L, s, W, W]``: ``cos∠(r_j, r_i, r_k)`` for j, k the window neighbours of vertex i."""
    x = x.float()
    m = keep[:, None, :, None].to(x.dtype)
    x = x - (x * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp_min(1)  # translation-invariant; smaller G
    g = x @ x.transpose(-1, -2)  # [b, L, s, s]
    g_ii = g.diagonal(dim1=-2, dim2=-1)  # [b, L, s]
    g_ij = torch.gather(g, -1, nb.expand(*g.shape[:2], *nb.shape))  # [b, L, s, W]
    g_jk = g[..., nb[:, :, None], nb[:, None, :]]  # [b, L, s, W, W]
    num = g_jk - g_ij[..., :, None] - g_ij[..., None, :] + g_ii[..., None, None]
    sq = g_ii[..., nb] - 2 * g_ij + g_ii[..., None]
    dist = torch.where(nb_ok[:, None], sq.clamp_min(_EPS).sqrt(), 1.0)
    return num / (dist[..., :, None] * dist[..., None, :])


def word_relation_angle(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, window_size: int,
                        causal: bool = False) -> torch.Tensor:
    """WR-Angle: per layer and real token i, the angles ``∠(r_j, r_i, r_k)`` for the real tokens
    j ≠ k within ``window_size // 2`` of i (decoders: before i); the squared errors summed over
    layers and triplets, divided by the number of tokens that have at least one triplet.

    Cost: ``b·L·s·W²`` angles per model (``W = window_size − 1``; decoders ``window_size // 2``).
    """
    nb, nb_ok = _window(keep, window_size, causal)
    w = nb.shape[1]
    trip = (keep[:, :, None, None] & nb_ok[..., :, None] & nb_ok[..., None, :]
            & ~torch.eye(w, dtype=torch.bool, device=keep.device))  # [b, s, W, W]
    rows = trip.flatten(2).any(-1)
    diff = _window_angles(student, keep, nb, nb_ok) - _window_angles(teacher, keep, nb, nb_ok)
    return torch.where(trip[:, None], diff**2, 0.0).sum() / rows.sum().clamp_min(1)


def layer_relation_distance(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LTR-Dist: per real token and layer l, ``softmax_m cos(r^l, r^m)`` over the other layers m;
    ``KL(teacher ‖ student)`` summed over l, averaged over real tokens."""
    n = student.shape[1]
    valid = ~torch.eye(n, dtype=torch.bool, device=keep.device)
    per_row = _kl_rows(_cosines(student.float().transpose(1, 2)), _cosines(teacher.float().transpose(1, 2)), valid)
    return (per_row.sum(-1) * keep).sum() / keep.sum().clamp_min(1)


def _layer_angles(x: torch.Tensor) -> torch.Tensor:
    """``[b, L, s, d]`` → ``[b, s, L, L, L]``: ``cos∠(r^m, r^l, r^n)`` at index (l, m, n)."""
    x = x.float().transpose(1, 2)
    x = x - x.mean(2, keepdim=True)
    g = x @ x.transpose(-1, -2)  # [b, s, L, L]
    g_ll = g.diagonal(dim1=-2, dim2=-1)
    num = g[..., None, :, :] - g[..., :, :, None] - g[..., :, None, :] + g_ll[..., :, None, None]
    n = g.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    dist = torch.where(off, (g_ll[..., None, :] - 2 * g + g_ll[..., :, None]).clamp_min(_EPS).sqrt(), 1.0)
    return num / (dist[..., :, :, None] * dist[..., :, None, :])


def layer_relation_angle(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LTR-Angle: per real token, the angles ``∠(r^m, r^l, r^n)`` over all triplets of distinct
    layers; the squared errors summed over triplets, averaged over real tokens (0 with fewer
    than 3 layers). Cost: ``b·s·L³`` angles per model."""
    n = student.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=keep.device)
    distinct = ~eye[:, :, None] & ~eye[:, None, :] & ~eye[None, :, :]  # l≠m, l≠n, m≠n
    diff = _layer_angles(student) - _layer_angles(teacher)
    se = torch.where(distinct & keep[:, :, None, None, None], diff**2, 0.0).sum()
    return se / keep.sum().clamp_min(1)
