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

from typing import Any, Literal

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



# ---------------------------------------------------------------- vocabulary-parallel softmax
# megatron's LM/MLM head is column-parallel: rank r of the TP group holds the logits of vocabulary
# entries [r*w, (r+1)*w) with w = padded_vocab / tp, and entries >= vocab_size are padding. The
# functions below compute losses that need a softmax over the whole vocabulary from those shards:
# one all-reduce (MAX) of the per-position maxima, one (SUM) of the exp-sums, one (SUM) of the
# local partial losses. Their backward is written out: the loss of every position is replicated
# after the last all-reduce, so the gradient wrt. this rank's logits is the local slice of the
# full-vocabulary gradient and needs no communication.

VocabLoss = Literal["ce", "kl", "mse"]


def _group_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def _reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _wide(*ts: torch.Tensor) -> torch.dtype:
    """The dtype the sums run in: at least fp32 (half-precision logits are summed in fp32), fp64 kept."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _valid_columns(width: int, vocab_size: int, rank: int, device: torch.device) -> torch.Tensor:
    """``[width]`` bool: which of this rank's columns are real vocabulary entries (not padding)."""
    return torch.arange(rank * width, (rank + 1) * width, device=device) < vocab_size


def _log_softmax_shards_(z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``log_softmax`` over the whole vocabulary, in place on the scratch tensor ``z`` ``[2, ..., w]``
    (student and teacher stacked, padding already ``-inf``): one MAX and one SUM all-reduce for both.
    In place because ``z`` is the size of the shards: no second copy of them."""
    peak = _reduce(z.amax(-1), dist.ReduceOp.MAX, group)
    z.sub_(peak.unsqueeze(-1))
    norm = _reduce(z.exp().sum(-1), dist.ReduceOp.SUM, group)
    return z.sub_(norm.log().unsqueeze(-1))


class _VocabParallelSoft(torch.autograd.Function):
    """Per-position soft loss between student and teacher vocabulary shards (see
    :func:`vocab_parallel_soft_per_position`). Backward, with ``p_s``/``p_t`` the softmaxes at
    temperature ``T`` and ``g`` the gradient of a position's loss:

    * ``ce = -Σ p_t log p_s`` and ``kl = Σ p_t (log p_t - log p_s)``:
      ``∂/∂s_j = g (p_s,j - p_t,j) / T`` (the entropy of ``p_t`` does not depend on ``s``);
      ``∂ce/∂t_j = -g p_t,j (log p_s,j + ce) / T``, ``∂kl/∂t_j = g p_t,j (log p_t,j - log p_s,j - kl) / T``;
    * ``mse = Σ (s - t)² / V``: ``∂/∂s_j = 2 g (s_j - t_j) / V = -∂/∂t_j``.

    Padding columns get a zero gradient. Without a teacher gradient only ``p_s - p_t`` (one
    shard) is kept for the backward.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, kind: VocabLoss, temperature: float,
                vocab_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
        _, rank = _group_rank(group)
        valid = _valid_columns(student.size(-1), vocab_size, rank, student.device)
        ctx.kind, ctx.temperature, ctx.vocab_size = kind, temperature, vocab_size
        ctx.dtypes = student.dtype, teacher.dtype
        dtype = _wide(student, teacher)
        zero = torch.zeros((), dtype=dtype, device=student.device)
        if kind == "mse":
            diff = torch.where(valid, student.to(dtype) - teacher.to(dtype), zero)
            out = _reduce(diff.square().sum(-1), dist.ReduceOp.SUM, group) / vocab_size
            ctx.save_for_backward(diff)
            return out
        z = torch.stack([student.to(dtype), teacher.to(dtype)])  # a copy: the scratch of the in-place ops
        log_p = _log_softmax_shards_(z.div_(temperature).masked_fill_(~valid, float("-inf")), group)
        log_ps, log_pt = log_p[0], log_p[1]
        p_t = log_pt.exp()
        # On padding p_t = 0 and log p_s = -inf (log p_t - log p_s is NaN): zero those terms.
        terms = p_t * log_ps if kind == "ce" else (log_pt - log_ps).mul_(p_t)
        partial = terms.masked_fill_(~valid, 0.0).sum(-1)
        del terms
        out = _reduce(-partial if kind == "ce" else partial, dist.ReduceOp.SUM, group)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(log_ps, log_pt, valid, out)
        else:
            ctx.save_for_backward(log_ps.exp().sub_(p_t))  # one shard, not the two log-probabilities
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g = grad.unsqueeze(-1)
        s_dtype, t_dtype = ctx.dtypes
        if ctx.kind == "mse":
            (diff,) = ctx.saved_tensors
            d = 2.0 * g * diff / ctx.vocab_size
            return d.to(s_dtype), (-d).to(t_dtype), None, None, None, None
        g = g / ctx.temperature
        if not ctx.needs_input_grad[1]:
            (direction,) = ctx.saved_tensors
            return (g * direction).to(s_dtype), None, None, None, None, None
        log_ps, log_pt, valid, out = ctx.saved_tensors
        p_t = log_pt.exp()
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        d_s = g * (log_ps.exp() - p_t)
        if ctx.kind == "ce":
            d_t = -g * torch.where(valid, p_t * (log_ps + out.unsqueeze(-1)), zero)
        else:
            d_t = g * torch.where(valid, p_t * (log_pt - log_ps - out.unsqueeze(-1)), zero)
        return d_s.to(s_dtype), d_t.to(t_dtype), None, None, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy against labels over vocabulary shards (see
    :func:`vocab_parallel_cross_entropy`). Backward: ``g (softmax - onehot(label))`` on this
    rank's columns, zero at ignored positions and on padding."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        _, rank = _group_rank(group)
        width = logits.size(-1)
        valid = _valid_columns(width, vocab_size, rank, logits.device)
        z = logits.to(_wide(logits)).masked_fill(~valid, float("-inf"))  # a copy, then in place
        z.sub_(_reduce(z.amax(-1), dist.ReduceOp.MAX, group).unsqueeze(-1))
        labelled = labels != ignore_index
        local = labels - rank * width
        mine = labelled & (local >= 0) & (local < width)
        index = torch.where(mine, local, torch.zeros_like(local)).unsqueeze(-1)
        zero = torch.zeros((), dtype=z.dtype, device=logits.device)
        picked = _reduce(torch.where(mine, z.gather(-1, index).squeeze(-1), zero), dist.ReduceOp.SUM, group)
        probs = z.exp_()
        norm = _reduce(probs.sum(-1), dist.ReduceOp.SUM, group)
        ctx.dtype = logits.dtype
        ctx.save_for_backward(probs.div_(norm.unsqueeze(-1)), index, mine, labelled)
        return torch.where(labelled, norm.log() - picked, zero)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        probs, index, mine, labelled = ctx.saved_tensors
        g = torch.where(labelled, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).unsqueeze(-1)
        d = probs * g
        d.scatter_add_(-1, index, -(g * mine.unsqueeze(-1)))
        return d.to(ctx.dtype), None, None, None, None


def _check_vocab(width: int, vocab_size: int, world: int) -> None:
    if not 0 < vocab_size <= width * world:
        raise ValueError(f"vocab_size {vocab_size} does not fit {world} shard(s) of {width} vocabulary entries")


def vocab_parallel_soft_per_position(kind: VocabLoss, student: torch.Tensor, teacher: torch.Tensor,
                                     vocab_size: int, temperature: float = 1.0,
                                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """A soft loss at every position from this rank's vocabulary shards, without gathering them.

    Args:
        kind: ``"ce"`` — ``-Σ softmax(t/T)·log_softmax(s/T)``; ``"kl"`` —
            ``KL(softmax(t/T) ‖ softmax(s/T))`` (no ``T²``); ``"mse"`` — the mean over the
            vocabulary of ``(s - t)²`` (``T`` unused). Sums run over the whole vocabulary.
        student, teacher: ``[..., w]`` — this rank's shard (``logits.vocab_shard``), rank ``r``
            holding entries ``[r·w, (r+1)·w)``; entries from ``vocab_size`` on are padding and
            excluded.
        vocab_size: The real vocabulary size.
        temperature: ``T``.
        group: The TP group (default: this rank's; none without parallel state, i.e. one shard).

    Returns:
        ``[...]`` in fp32 (fp64 for fp64 inputs), the same on every rank of the group: what the unsharded loss gives on
        the gathered logits ``[..., :vocab_size]``. Differentiable wrt. both inputs; a rank's
        gradient is its slice of the full gradient (no communication in the backward). A
        collective: every rank of the group must call it.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher shards differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    if kind not in ("ce", "kl", "mse"):
        raise ValueError(f"unknown soft loss {kind!r}; use 'ce', 'kl' or 'mse'")
    world, group = _tp_size(group)
    _check_vocab(student.size(-1), vocab_size, world)
    return _VocabParallelSoft.apply(student, teacher, kind, float(temperature), vocab_size,
                                    group if world > 1 else None)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                 ignore_index: int = -100, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Cross-entropy of every token from this rank's vocabulary shard, without gathering it.

    Args:
        logits: ``[..., w]`` — this rank's shard (``logits.vocab_shard``); padding columns
            (global index ``>= vocab_size``) are excluded from the softmax.
        labels: ``[...]`` global vocabulary ids, or ``ignore_index``.
        vocab_size: The real vocabulary size.

    Returns:
        ``[...]`` in fp32 (fp64 for fp64 inputs), the same on every rank: ``-log softmax(logits)[label]``, 0 where the label
        is ``ignore_index``. Differentiable wrt. ``logits``. A collective.

    Raises:
        ValueError: a label outside ``[0, vocab_size)`` that is not ``ignore_index``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    world, group = _tp_size(group)
    _check_vocab(logits.size(-1), vocab_size, world)
    labelled = labels != ignore_index
    if bool((labelled & ((labels < 0) | (labels >= vocab_size))).any()):
        raise ValueError(f"labels must be in [0, {vocab_size}) or {ignore_index}")
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_size, ignore_index, group if world > 1 else None)


__all__ = [
    "all_reduce_mean_over_tp",
    "all_reduce_sum_over_tp",
    "any_rank",
    "gather_along_dim",
    "gather_heads",
    "gather_last_dim",
    "gather_over_dp",
    "mean_over_dp",
    "shard_along_dim",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_soft_per_position",
]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank of the job (one all-reduce; local without a job)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
