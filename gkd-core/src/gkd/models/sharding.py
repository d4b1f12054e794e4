"""How each gkd parameter is split over tensor-parallel ranks.

gkd names its parameters itself, so the split rule is a function of the name:

* ``vocab`` — ``embeddings.word_embeddings.weight``, ``lm_head.weight``,
  ``mlm_decoder.weight|bias`` and MobileBERT's ``mlm_dense.weight`` /
  ``mlm_word_decoder.weight`` (``[Vp, ·]``, the transpose of HF's ``cls.predictions.dense``):
  rank r holds rows ``[r·Vp/tp, (r+1)·Vp/tp)`` of the vocabulary padded to ``Vp`` (a multiple of tp);
* ``column`` — ``*.linear_qkv.weight|bias`` (rank r's query groups, megatron's fused
  ``[q heads of g; k_g; v_g]`` per group), MobileBERT's separate ``*.linear_q|k|v.weight|bias``
  (rank r's heads) and the encoder's ``*.linear_fc1.weight|bias``: rows;
* ``glu`` — the decoder's ``*.linear_fc1.weight``: ``[gate_r; up_r]``;
* ``row`` — ``*.linear_proj.weight``, ``*.linear_fc2.weight``: columns;
* ``replicated`` — everything else (norms, biases after a row-parallel layer, positions,
  token types, pooler, classifier, MLM transform, MobileBERT's bottleneck projections and
  embedding transformation): the full tensor on every rank.

"Full" tensors are in the TP=1 megatron layout (qkv interleaved per query group, ``[gate; up]``
stacked, padded vocabulary). :mod:`gkd.models.checkpoint` reads each rank's part from HF files
and uses :func:`gather_full` to merge parts for export.
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


_VOCAB_PARAMS = frozenset(
    {
        "embeddings.word_embeddings.weight",
        "lm_head.weight",
        "mlm_decoder.weight",
        "mlm_decoder.bias",
        "mlm_dense.weight",
        "mlm_word_decoder.weight",
    }
)
_COLUMN_SUFFIXES = tuple(
    f".{name}.{w}" for name in ("linear_qkv", "linear_q", "linear_k", "linear_v") for w in ("weight", "bias")
)


def shard_kind(name: str, config: ModelConfig) -> ShardKind:
    """Split rule of parameter ``name`` of a model with ``config``."""
    if name in _VOCAB_PARAMS:
        return ShardKind.VOCAB
    if name.endswith(_COLUMN_SUFFIXES):
        return ShardKind.COLUMN
    if name.endswith((".linear_fc1.weight", ".linear_fc1.bias")):
        return ShardKind.GLU if config.family == "decoder" else ShardKind.COLUMN
    if name.endswith((".linear_proj.weight", ".linear_fc2.weight")):
        return ShardKind.ROW
    return ShardKind.REPLICATED


def gather_full(
    local: torch.Tensor, kind: ShardKind, group: dist.ProcessGroup | None, tp: int
) -> torch.Tensor:
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


__all__ = ["ShardKind", "gather_full", "shard_kind"]
