"""Distributed setup and tensor-parallel helpers for gkd.

* :func:`ensure_initialized` / :func:`initialize` — process group + megatron parallel state.
* :func:`gather_heads`, :func:`gather_last_dim`, :func:`all_reduce_mean_over_tp`, … —
  differentiable TP collectives that losses over sharded features need.
* :func:`run_distributed` — spawn N local gloo workers (used by the TP tests).
* :func:`apply_cpu_compat` — the CPU patches for megatron-core (applied automatically).
"""

from gkd.parallel.comm import (
    all_reduce_mean_over_tp,
    all_reduce_sum_over_tp,
    gather_along_dim,
    gather_heads,
    gather_last_dim,
    shard_along_dim,
)
from gkd.parallel.compat import apply_cpu_compat, cpu_compat_applied
from gkd.parallel.launch import DistributedWorkerError, run_distributed
from gkd.parallel.state import (
    DEFAULT_SEED,
    barrier,
    destroy,
    dp_rank,
    dp_world_size,
    ensure_initialized,
    find_free_port,
    initialize,
    is_global_rank_zero,
    is_initialized,
    tp_group,
    tp_rank,
    tp_world_size,
)

__all__ = [
    "DEFAULT_SEED",
    "DistributedWorkerError",
    "all_reduce_mean_over_tp",
    "all_reduce_sum_over_tp",
    "apply_cpu_compat",
    "barrier",
    "cpu_compat_applied",
    "destroy",
    "dp_rank",
    "dp_world_size",
    "ensure_initialized",
    "find_free_port",
    "gather_along_dim",
    "gather_heads",
    "gather_last_dim",
    "initialize",
    "is_global_rank_zero",
    "is_initialized",
    "run_distributed",
    "shard_along_dim",
    "tp_group",
    "tp_rank",
    "tp_world_size",
]
