"""Differentiable TP collectives, checked on two gloo processes against the unsharded math."""

from __future__ import annotations

import pytest
import torch

from gkd import parallel
from gkd.parallel.comm import gather_over_dp

pytestmark = pytest.mark.distributed


def _full_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 5, 6, generator=g)


def _reference() -> dict[str, torch.Tensor]:
    heads, ctx = (t.clone().requires_grad_() for t in _full_inputs())
    loss = heads.square().sum() + (ctx * torch.arange(6.0)).sum() + ctx.square().mean()
    loss.backward()
    return {"loss": loss.detach(), "heads_grad": heads.grad, "ctx_grad": ctx.grad}


def comm_worker() -> dict[str, torch.Tensor]:
    """Each rank holds half the heads / half the last dimension (module level for the launcher)."""
    rank, tp = parallel.tp_rank(), parallel.tp_world_size()
    heads_full, ctx_full = _full_inputs()
    heads = parallel.shard_along_dim(heads_full, 1).clone().requires_grad_()
    ctx = parallel.shard_along_dim(ctx_full, -1).clone().requires_grad_()
    gathered_heads = parallel.gather_heads(heads)
    gathered_ctx = parallel.gather_last_dim(ctx)
    # Same loss as the reference: gathered terms everywhere, plus a shard-local mean reduced over TP.
    loss = (
        gathered_heads.square().sum()
        + (gathered_ctx * torch.arange(6.0)).sum()
        + parallel.all_reduce_mean_over_tp(ctx.square().mean())
    )
    loss.backward()
    summed = parallel.all_reduce_sum_over_tp(torch.tensor([float(rank + 1)], requires_grad=True))
    return {
        "rank": torch.tensor(rank),
        "tp": torch.tensor(tp),
        "loss": loss.detach(),
        "gathered_heads": gathered_heads.detach(),
        "gathered_ctx": gathered_ctx.detach(),
        "heads_grad": heads.grad,
        "ctx_grad": ctx.grad,
        "summed": summed.detach(),
        "dp_noop": torch.tensor(gather_over_dp(heads) is heads),  # TP=2 on 2 ranks: DP size 1
    }


def failing_worker() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.barrier()  # rank 0 would wait forever: the launcher must stop it


def test_gather_and_reduce_match_unsharded_math() -> None:
    ref = _reference()
    heads_full, ctx_full = _full_inputs()
    results = parallel.run_distributed(comm_worker, 2)
    for r, res in enumerate(results):
        assert int(res["rank"]) == r and int(res["tp"]) == 2
        torch.testing.assert_close(res["gathered_heads"], heads_full, rtol=0, atol=0)
        torch.testing.assert_close(res["gathered_ctx"], ctx_full, rtol=0, atol=0)
        torch.testing.assert_close(res["loss"], ref["loss"])
        # Each rank's gradient is its slice of the unsharded gradient.
        torch.testing.assert_close(res["heads_grad"], ref["heads_grad"].chunk(2, dim=1)[r])
        torch.testing.assert_close(res["ctx_grad"], ref["ctx_grad"].chunk(2, dim=-1)[r])
        assert float(res["summed"]) == 3.0
        assert bool(res["dp_noop"])


def test_worker_errors_surface_in_the_parent() -> None:
    with pytest.raises(
        parallel.DistributedWorkerError, match=r"(?s)^rank 1 failed first.*rank 1 failed on purpose"
    ):
        parallel.run_distributed(failing_worker, 2, megatron=False, timeout_s=60)


def test_single_rank_collectives_are_identities() -> None:
    parallel.ensure_initialized()
    t = torch.randn(2, 3, 4)
    for fn in (
        parallel.gather_heads,
        parallel.gather_last_dim,
        parallel.all_reduce_mean_over_tp,
        parallel.all_reduce_sum_over_tp,
    ):
        assert fn(t) is t
    assert parallel.shard_along_dim(t, 1, rank=1, world=3).shape == (2, 1, 4)
    with pytest.raises(ValueError, match="not divisible by tp"):
        parallel.shard_along_dim(t, 2, rank=0, world=3)
    with pytest.raises(ValueError, match="module-level function"):
        parallel.run_distributed(lambda: None, 2)


DP_ROWS = (1, 3)  # uneven on purpose: rank 0 holds example 0, rank 1 examples 1-3


def _dp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(sum(DP_ROWS), 5, generator=g), torch.randn(5, 4, generator=g)


def _rank_loss(local: torch.Tensor, everyone: torch.Tensor, start: int) -> torch.Tensor:
    """A per-rank loss that reads the rank's own rows directly and everybody's through the gather
    (in-batch negatives): the mean over local rows of a softmax cross-entropy against all rows,
    the row itself (at ``start + i``) being the positive."""
    logits = local @ everyone.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(start, start + local.shape[0]))


def _dp_reference() -> dict[str, torch.Tensor]:
    """One process, the whole batch: the objective is the mean of the two ranks' losses."""
    x, w = _dp_inputs()
    w = w.clone().requires_grad_()
    h = x @ w
    h.retain_grad()
    parts = h.split(DP_ROWS)
    loss = sum(_rank_loss(p, h, sum(DP_ROWS[:r])) for r, p in enumerate(parts)) / len(parts)
    loss.backward()
    return {"loss": loss.detach(), "w_grad": w.grad, "h_grad": h.grad, "h": h.detach()}


def dp_worker() -> dict[str, torch.Tensor]:
    """DP=2 (TP=1): each rank projects its own rows with a replicated weight, gathers everybody's
    and averages the weight gradient over the ranks as DDP/DeepSpeed do."""
    import torch.distributed as dist

    rank = parallel.dp_rank()
    x, w = _dp_inputs()
    w = w.clone().requires_grad_()
    local = x.split(DP_ROWS)[rank] @ w
    local.retain_grad()
    everyone = gather_over_dp(local)
    loss = _rank_loss(local, everyone, sum(DP_ROWS[:rank]))
    loss.backward()
    averaged = w.grad.clone()
    dist.all_reduce(averaged)
    return {"rank": torch.tensor(rank), "dp": torch.tensor(parallel.dp_world_size()), "loss": loss.detach(),
            "gathered": everyone.detach(), "local_grad": local.grad, "w_grad": averaged / 2}


def test_gather_over_dp_gives_the_single_process_gradient() -> None:
    ref = _dp_reference()
    results = parallel.run_distributed(dp_worker, 2, tp=1)
    assert [int(r["dp"]) for r in results] == [2, 2]
    # The mean of the ranks' losses is the single-process objective.
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, ref["loss"])
    for r, res in enumerate(results):
        assert int(res["rank"]) == r
        torch.testing.assert_close(res["gathered"], ref["h"], rtol=0, atol=0)
        # The averaged weight gradient is the single-process gradient ...
        torch.testing.assert_close(res["w_grad"], ref["w_grad"])
        # ... because each rank's rows get the sum of every rank's gradient: 2 x the objective's.
        torch.testing.assert_close(res["local_grad"], 2 * ref["h_grad"].split(DP_ROWS)[r])


def test_gather_over_dp_is_the_identity_at_dp_size_1() -> None:
    t = torch.randn(3, 2)
    assert gather_over_dp(t) is t
