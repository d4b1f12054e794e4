"""Autograd-aware tensor-parallel collectives for distillation losses.

Per-head features (``layers.{i}.attention.*``, ``layers.{i}.ffn.intermediate``) are sharded
over the TP group: each rank holds ``heads / tp`` heads. A loss over them has two correct
shapes:

* **gather, then compute the same loss on every rank** — :func:`gather_heads`,
  :func:`gather_last_dim`, :func:`gather_along_dim`. The backward keeps only this rank's
  slice of the gradient, which is right because every rank holds an identical copy of the
  loss (the optimiser must count it once, as megatron does for its replicated losses).
* **compute on the local shard, then reduce** — :func:`all_reduce_mean_over_tp` (exact mean
  when shards are equal-sized, e.g. a mean over heads) or :func:`all_reduce_sum_over_tp`.

With TP size 1 every function returns its input unchanged.

One collective runs over the **data-parallel** group instead: :func:`gather_over_dp`, the
batches of every DP rank concatenated (LRC-BERT's cross-rank negatives). It is a no-op with DP
size 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gkd.parallel.state import is_initialized, tp_group, tp_rank, tp_world_size


def _tp_size(group: dist.ProcessGroup | None) -> tuple[int, dist.ProcessGroup | None]:
    """(size, group) of the TP group; size 1 when no parallel state exists, so losses built on
    these helpers also run on plain tensors (unit tests, research code without models)."""
    if group is None:
        if not is_initialized():
            return 1, None
        group = tp_group()
    return dist.get_world_size(group), group


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), x.size(dim)
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.scale = scale
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out * scale if scale != 1.0 else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank holds the same reduced value; d(out)/d(x_r) = scale on the rank owning x_r.
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


def gather_along_dim(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather equal-sized TP shards and concatenate them along ``dim`` (differentiable)."""
    world, group = _tp_size(group)
    if world == 1:
        return t
    return _GatherAlongDim.apply(t, dim % t.dim(), group)


def gather_heads(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Full-head view of a head-sharded feature ``[b, heads_local, ...]`` → ``[b, heads, ...]``.

    Use for ``attention.query|key|value|scores|probs``. Heads are ordered as in the unsharded
    model (rank 0 holds the first ``heads/tp``).
    """
    return gather_along_dim(t, 1, group)


def gather_last_dim(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate last-dimension shards: ``attention.context`` ``[b, s, heads_local*d]`` →
    ``[b, s, heads*d]``, ``ffn.intermediate`` ``[b, s, ffn_local]`` → ``[b, s, ffn]``.

    For a SwiGLU decoder, ``ffn.intermediate`` is ``silu(gate)*up``, already one block per
    rank, so this concatenation equals the TP=1 tensor.
    """
    return gather_along_dim(t, -1, group)


def all_reduce_sum_over_tp(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a per-rank partial value over the TP group (differentiable)."""
    world, group = _tp_size(group)
    if world == 1:
        return t
    return _AllReduce.apply(t, 1.0, group)


def all_reduce_mean_over_tp(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Average a per-rank value over the TP group (differentiable).

    A mean computed over each rank's equal-sized shard, averaged this way, equals the mean
    over the full tensor.
    """
    world, group = _tp_size(group)
    if world == 1:
        return t
    return _AllReduce.apply(t, 1.0 / world, group)


class _GatherOverDP(torch.autograd.Function):
    """All-gather along dim 0 over the DP group; rows may differ in number between ranks.

    Backward: the gradient of the gathered tensor is summed over the DP ranks, and each rank
    keeps its own rows. Each DP rank computes a *different* loss from the gathered tensor (its
    own examples against everybody's), and the optimiser averages the ranks' gradients; the
    sum makes that average the gradient of the mean of the ranks' losses with respect to every
    rank's rows, i.e. the single-process gradient of the same objective on the whole batch.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group=group)
        counts = [int(n) for n in sizes]
        longest = max(counts)
        padded = x.contiguous()
        if x.shape[0] < longest:  # all_gather needs equal shapes: pad the rows, strip them after
            padded = torch.cat([padded, padded.new_zeros(longest - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        ctx.group, ctx.start, ctx.rows = group, sum(counts[:rank]), x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total.narrow(0, ctx.start, ctx.rows).contiguous(), None


def _dp_group() -> tuple[int, dist.ProcessGroup | None]:
    """(size, group) of this rank's data-parallel group; size 1 without parallel state."""
    if not is_initialized():
        return 1, None
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    return dist.get_world_size(group), group


def gather_over_dp(t: torch.Tensor) -> torch.Tensor:
    """The rows (dim 0, the batch) of every data-parallel rank, concatenated in DP-rank order
    (differentiable); ``t`` itself with DP size 1 or without parallel state.

    The ranks' tensors must agree in every dimension but the first; the number of rows may
    differ. This rank's rows start at the sum of the row counts of the lower DP ranks. The
    backward sums the gathered tensor's gradient over the DP ranks before taking this rank's
    rows: with per-rank losses ``L_r`` (each rank its own examples, against all gathered rows)
    and the usual averaging of gradients over DP ranks (DDP, DeepSpeed), the student receives
    the gradient of ``mean_r L_r`` — with equal local batches and per-rank means, the gradient
    a single process computes on the concatenated batch. Every DP rank must call it (and run
    the backward) in the same order: it is a collective.
    """
    world, group = _dp_group()
    if world == 1:
        return t
    return _GatherOverDP.apply(t, group)


def mean_over_dp(values: dict[str, float]) -> dict[str, float]:
    """Average python numbers over the data-parallel ranks (a collective; same keys on every rank).

    What the loop logs and hands to ``after_step``: each DP rank computes its loss terms on its
    own examples, and their mean is the single-process value on the whole batch (equal local
    batches). Method states updated from it stay equal on every rank.
    """
    world, group = _dp_group()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def shard_along_dim(
    t: torch.Tensor, dim: int, rank: int | None = None, world: int | None = None
) -> torch.Tensor:
    """This rank's contiguous 1/tp slice of a full tensor (no communication, no autograd)."""
    rank = tp_rank() if rank is None else rank
    world = tp_world_size() if world is None else world
    if t.size(dim) % world:
        raise ValueError(f"dimension {dim} of size {t.size(dim)} is not divisible by tp ({world})")
    return t.chunk(world, dim=dim)[rank]


__all__ = [
    "all_reduce_mean_over_tp",
    "all_reduce_sum_over_tp",
    "gather_along_dim",
    "gather_heads",
    "gather_last_dim",
    "gather_over_dp",
    "mean_over_dp",
    "shard_along_dim",
]
