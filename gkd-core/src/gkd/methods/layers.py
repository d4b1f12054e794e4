"""Teacher-to-student layer mappings, written once for every method.

All mappings return *boundaries*: ``m[0] = 0`` (embeddings) and ``m[j]`` = the teacher layer
count whose output student layer ``j`` (1-based) imitates, so student hidden state ``j``
pairs with teacher hidden state ``m[j]`` (hidden state 0 is the embedding output).
"""

from __future__ import annotations

import torch


def uniform_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Split T layers into S contiguous, near-equal segments (front segments larger).

    12→6 gives ``[0, 2, 4, 6, 8, 10, 12]``; 12→5 gives ``[0, 3, 6, 8, 10, 12]``.
    """
    _check(teacher_layers, student_layers)
    base, extra = divmod(teacher_layers, student_layers)
    out = [0]
    for j in range(student_layers):
        out.append(out[-1] + base + (1 if j < extra else 0))
    return out


def stride_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Integer stride ``k = T // S``: ``[0, k, 2k, …, S·k]`` (PKD, MGSKD, DIITO)."""
    _check(teacher_layers, student_layers)
    k = teacher_layers // student_layers
    return [j * k for j in range(student_layers + 1)]


def random_map(teacher_layers: int, student_layers: int, generator: torch.Generator) -> list[int]:
    """Sorted random choice of S−1 intermediate teacher layers, ends fixed (RAIL-KD, TinyBERT option)."""
    _check(teacher_layers, student_layers)
    if student_layers == 1:
        return [0, teacher_layers]
    picks = torch.randperm(teacher_layers - 1, generator=generator)[: student_layers - 1] + 1
    return [0, *sorted(int(p) for p in picks), teacher_layers]


def _check(teacher_layers: int, student_layers: int) -> None:
    if student_layers < 1 or teacher_layers < student_layers:
        raise ValueError(f"cannot map {teacher_layers} teacher layers onto {student_layers} student layers")


def hidden_tap(index: int) -> str:
    """Tap name of hidden state ``index`` (0 = embeddings, j = output of layer j−1)."""
    return "embeddings" if index == 0 else f"layers.{index - 1}.output"
