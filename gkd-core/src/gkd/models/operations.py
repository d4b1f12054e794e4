"""Ready-made operation hooks for :meth:`GkdModel.capture`.

An operation is a callable attached at a tap name. For tensor taps it receives the value in
the documented batch-first layout and returns the value to continue with (same shape); for
the ``layers`` point it receives the list of layer modules and returns the list to run::

    with student.capture(operations={
        "embeddings": add_perturbation(delta),                 # LRC-BERT-style noise
        "layers.2.output": write_span(recorded, dst_start, length=4, src_start=src_start),  # DIITO
        "layers": swap_layers({1: teacher.layers[2:4]}),       # Theseus
    }):
        out = student(ids, mask)

Operations are attached for that one forward pass and detached afterwards, also when the
pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gkd.models.taps import Operation

TensorOp = Callable[[torch.Tensor], torch.Tensor]
LayersOp = Callable[[list[nn.Module]], list[nn.Module]]


def replace_with(value: torch.Tensor) -> TensorOp:
    """Replace the tapped value by ``value`` (same shape), e.g. another layer's output."""

    def op(t: torch.Tensor) -> torch.Tensor:
        return value.to(dtype=t.dtype, device=t.device)

    return op


def add_perturbation(delta: torch.Tensor | TensorOp) -> TensorOp:
    """Add ``delta`` (a tensor broadcastable to the value, or ``fn(value) -> delta``)."""

    def op(t: torch.Tensor) -> torch.Tensor:
        d = delta(t) if callable(delta) else delta
        return t + d.to(dtype=t.dtype, device=t.device)

    return op


def write_positions(values: torch.Tensor, positions: torch.Tensor) -> TensorOp:
    """Overwrite the positions where ``positions`` (bool ``[b, s]``) is True with ``values`` ``[b, s, ...]``."""

    def op(t: torch.Tensor) -> torch.Tensor:
        mask = positions.to(device=t.device, dtype=torch.bool)
        mask = mask.reshape(*mask.shape, *([1] * (t.dim() - mask.dim())))
        return torch.where(mask, values.to(dtype=t.dtype, device=t.device), t)

    return op


def write_span(
    values: torch.Tensor,
    start: int | torch.Tensor,
    length: int,
    *,
    src_start: int | torch.Tensor | None = None,
) -> TensorOp:
    """Write ``values[b, src_start[b] : src_start[b]+length]`` into positions
    ``start[b] : start[b]+length`` of a hidden-like value ``[b, s, ...]``.

    ``start`` / ``src_start`` are ints or ``[b]`` tensors (per-example spans, as in DIITO's
    interchange intervention); ``src_start`` defaults to ``start``. ``values`` is a recorded
    feature of the same layout (its sequence length may differ). Differentiable in both the
    tapped value and ``values``.
    """

    def op(t: torch.Tensor) -> torch.Tensor:
        b, s = t.shape[:2]
        dst = torch.as_tensor(start, device=t.device).expand(b)
        src = dst if src_start is None else torch.as_tensor(src_start, device=t.device).expand(b)
        if bool(((dst < 0) | (dst + length > s)).any()) or bool(
            ((src < 0) | (src + length > values.size(1))).any()
        ):
            raise IndexError(f"span of length {length} does not fit: starts {dst.tolist()} / {src.tolist()}")
        pos = torch.arange(s, device=t.device)[None, :]
        inside = (pos >= dst[:, None]) & (pos < dst[:, None] + length)  # [b, s]
        src_pos = torch.where(inside, pos - dst[:, None] + src[:, None], 0)  # [b, s]
        index = src_pos.reshape(b, s, *([1] * (t.dim() - 2))).expand(b, s, *t.shape[2:])
        picked = torch.gather(values.to(dtype=t.dtype, device=t.device), 1, index)
        return torch.where(inside.reshape(b, s, *([1] * (t.dim() - 2))), picked, t)

    return op


def swap_layers(replacements: Mapping[int, nn.Module | Sequence[nn.Module]]) -> LayersOp:
    """For the ``layers`` point: replace layer ``i`` by a module or a sequence of modules.

    The modules must take ``(hidden [s, b, h], attention_mask=...)`` — any gkd layer of a
    model with the same hidden size qualifies, e.g. a teacher block (Theseus). A sequence
    changes the number of layers, so later ``layers.{j}.*`` taps refer to the new positions.
    """

    def op(layers: list[nn.Module]) -> list[nn.Module]:
        bad = sorted(i for i in replacements if not 0 <= i < len(layers))
        if bad:
            raise IndexError(f"swap_layers: no layer(s) {bad} in a stack of {len(layers)}")
        out: list[nn.Module] = []
        for i, layer in enumerate(layers):
            new = replacements.get(i, layer)
            out.extend(
                [new] if isinstance(new, nn.Module) and not isinstance(new, nn.ModuleList) else list(new)
            )
        return out

    return op


def compose(*ops: Operation) -> Operation:
    """Apply several operations in order at one point (each gets the previous one's result).

    The engine composes the operations of several methods at one point with this, in the
    order of the stage's ``methods`` list; a single operation is returned as it is.
    """
    if len(ops) == 1:
        return ops[0]

    def op(value: Any) -> Any:
        for fn in ops:
            value = fn(value)
        return value

    return op


__all__ = ["add_perturbation", "compose", "replace_with", "swap_layers", "write_positions", "write_span"]
