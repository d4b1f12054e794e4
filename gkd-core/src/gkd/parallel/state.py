"""Process-group and megatron-core parallel-state setup.

gkd keeps megatron-core's process-global parallel state (``megatron.core.parallel_state``):
every model built in a process shares one tensor-parallel (TP) group, so rank ``r`` of a TP
group holds shard ``r`` of every teacher and of the student.

Two entry points:

* :func:`initialize` — for launched jobs (torchrun, DeepSpeed, :func:`gkd.parallel.run_distributed`):
  the default process group already exists; set up TP groups and RNG streams on it.
* :func:`ensure_initialized` — for single-process use (notebooks, plain pytest): creates a
  one-process group on a free local port when none exists, then calls :func:`initialize`.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from gkd.parallel.compat import apply_cpu_compat

DEFAULT_SEED = 1234
"""Seed of megatron's named RNG streams (dropout inside TP regions) when none is given."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(tp: int = 1, *, seed: int = DEFAULT_SEED) -> None:
    """Initialise megatron-core's parallel state on the existing default process group.

    Args:
        tp: Tensor-parallel size; must divide the world size (the rest is data parallel).
        seed: Seed of megatron's RNG tracker streams.

    Raises:
        RuntimeError: No default process group, or parallel state already initialised
            with a different TP size.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("gkd.parallel.initialize needs torch.distributed to be initialised first")
    apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tp:
            raise RuntimeError(f"parallel state already initialised with tp={current}, asked for tp={tp}")
        return
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tp ({tp}) must be a positive divisor of the world size ({world})")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ensure_initialized(tp: int = 1, *, seed: int = DEFAULT_SEED) -> None:
    """Make megatron parallel state usable, creating a 1-process group if there is none.

    Safe to call repeatedly. With an existing process group this is :func:`initialize`.

    Raises:
        RuntimeError: ``tp > 1`` without a launched multi-process job.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if tp != 1:
            raise RuntimeError(
                f"tp={tp} needs a multi-process job (torchrun or gkd.parallel.run_distributed); "
                "no process group is initialised"
            )
        dist.init_process_group(
            backend=_backend(), init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        initialize(tp, seed=seed)
    else:
        apply_cpu_compat()
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tp:
            raise RuntimeError(f"parallel state already initialised with tp={current}, asked for tp={tp}")


def destroy() -> None:
    """Tear down megatron parallel state and the default process group (for tests)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether megatron parallel state is ready."""
    from megatron.core import parallel_state

    return bool(parallel_state.model_parallel_is_initialized())


def tp_group() -> dist.ProcessGroup:
    """The tensor-parallel process group of this rank."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_world_size() -> int:
    """Number of ranks in this rank's tensor-parallel group."""
    from megatron.core import parallel_state

    return int(parallel_state.get_tensor_model_parallel_world_size())


def tp_rank() -> int:
    """Rank of this process inside its tensor-parallel group."""
    from megatron.core import parallel_state

    return int(parallel_state.get_tensor_model_parallel_rank())


def dp_rank() -> int:
    """Rank of this process inside its data-parallel group (0 without parallel state)."""
    from megatron.core import parallel_state

    return int(parallel_state.get_data_parallel_rank()) if is_initialized() else 0


def dp_world_size() -> int:
    """Number of data-parallel ranks (1 without parallel state)."""
    from megatron.core import parallel_state

    return int(parallel_state.get_data_parallel_world_size()) if is_initialized() else 1


def is_global_rank_zero() -> bool:
    """True on the process that writes files (rank 0, or no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Barrier on the default group; a no-op without one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = [
    "DEFAULT_SEED",
    "barrier",
    "destroy",
    "dp_rank",
    "dp_world_size",
    "ensure_initialized",
    "find_free_port",
    "initialize",
    "is_global_rank_zero",
    "is_initialized",
    "tp_group",
    "tp_rank",
    "tp_world_size",
]
