"""How each gkd parameter is split over tensor-parallel ranks, and moving between full and local.

gkd names its parameters itself, so the split rule is a function of the name:

=============================================  ==========  ===============================
parameter                                      kind        local part on rank r of tp
=============================================  ==========  ===============================
``embeddings.word_embeddings.weight``          vocab       rows ``r``-th 1/tp of padded V
``lm_head.weight``, ``mlm_decoder.weight|bias``  vocab       same
``*.linear_qkv.weight|bias``                   column      rows: query groups of rank r
``*.linear_fc1.weight|bias`` (encoder)         column      rows
``*.linear_fc1.weight`` (decoder, SwiGLU)      glu         ``[gate_r; up_r]``
``*.linear_proj.weight``, ``*.linear_fc2.weight``  row         columns
everything else (norms, biases after a row-    replicated  the full tensor
parallel layer, positions, pooler, classifier)
=============================================  ==========  ===============================

"Full" tensors here are in the TP=1 megatron layout (qkv interleaved per query group,
``[gate; up]`` stacked, vocabulary padded to a multiple of tp).
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

from gkd.models.config import ModelConfig


class ShardKind(enum.Enum):
    """Tensor-parallel split rule of a parameter."""

    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    GLU = "glu"
    VOCAB = "vocab"


_VOCAB_PARAMS = frozenset({"embeddings.word_embeddings.weight", "lm_head.weight", "mlm_decoder.weight", "mlm_decoder.bias"})


def shard_kind(name: str, config: ModelConfig) -> ShardKind:
    """Split rule of parameter ``name`` of a model with ``config``."""
    if name in _VOCAB_PARAMS:
        return ShardKind.VOCAB
    if name.endswith((".linear_qkv.weight", ".linear_qkv.bias")):
        return ShardKind.COLUMN
    if name.endswith((".linear_fc1.weight", ".linear_fc1.bias")):
        return ShardKind.GLU if config.family == "decoder" else ShardKind.COLUMN
    if name.endswith((".linear_proj.weight", ".linear_fc2.weight")):
        return ShardKind.ROW
    return ShardKind.REPLICATED


def local_slice(full: torch.Tensor, kind: ShardKind, rank: int, tp: int, padded_rows: int | None = None) -> torch.Tensor:
    """This rank's part of a full tensor.

    Args:
        full: Full (TP=1 layout) tensor; for ``VOCAB`` it may be unpadded.
        kind: Split rule.
        rank: Rank inside the TP group.
        tp: TP size.
        padded_rows: For ``VOCAB``: number of rows after padding (zeros are appended).
    """
    if kind is ShardKind.VOCAB and padded_rows is not None and full.size(0) < padded_rows:
        pad = full.new_zeros((padded_rows - full.size(0), *full.shape[1:]))
        full = torch.cat([full, pad], dim=0)
    if tp == 1 or kind is ShardKind.REPLICATED:
        return full
    if kind in (ShardKind.COLUMN, ShardKind.VOCAB):
        return _chunk(full, 0, rank, tp)
    if kind is ShardKind.ROW:
        return _chunk(full, 1, rank, tp)
    gate, up = full.chunk(2, dim=0)
    return torch.cat([_chunk(gate, 0, rank, tp), _chunk(up, 0, rank, tp)], dim=0)


def _chunk(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    if t.size(dim) % tp:
        raise ValueError(f"cannot split dimension {dim} of size {t.size(dim)} over tp={tp}")
    return t.chunk(tp, dim=dim)[rank]


def gather_full(local: torch.Tensor, kind: ShardKind, group: dist.ProcessGroup | None, tp: int) -> torch.Tensor:
    """Reassemble a full (TP=1 layout, still padded) tensor from every rank's part.

    Collective over ``group`` when ``tp > 1`` and the parameter is sharded.
    """
    local = local.detach()
    if tp == 1 or kind is ShardKind.REPLICATED:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if kind in (ShardKind.COLUMN, ShardKind.VOCAB):
        return torch.cat(parts, dim=0)
    if kind is ShardKind.ROW:
        return torch.cat(parts, dim=1)
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


__all__ = ["ShardKind", "gather_full", "local_slice", "shard_kind"]
