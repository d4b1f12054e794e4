"""Process-group and megatron-core parallel-state setup.

gkd keeps megatron-core's process-global parallel state (``megatron.core.parallel_state``):
every model built in a process shares one tensor-parallel (TP) group, so rank ``r`` of a TP
group holds shard ``r`` of every teacher and of the student.

Two entry points:

* :func:`initialize` — the default process group already exists (:func:`gkd.parallel.run_distributed`,
  user code that made its own); set up TP groups and RNG streams on it.
* :func:`ensure_initialized` — what the trainer calls: creates the default group when none exists,
  from the launcher's environment (``torchrun``, the ``deepspeed`` launcher: ``WORLD_SIZE``, ``RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``; ``env://``, gloo on CPU, NCCL on CUDA) or, outside
  a launcher (notebooks, plain pytest), a one-process group on a free local port; checks the
  layout (TP × DP = world size), then calls :func:`initialize`.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gkd.errors import GkdError
from gkd.parallel.compat import apply_cpu_compat

DEFAULT_SEED = 1234
"""Seed of megatron's named RNG streams (dropout inside TP regions) when none is given."""

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective waits for its peers before failing (``parallel.timeout_s``)."""

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``env://`` initialisation reads; ``torchrun`` and the ``deepspeed`` launcher set all of them."""


class LaunchError(GkdError):
    """The launcher's environment, or the job's layout, does not fit the run.

    Every rank sees the same environment and config, so every rank raises the same message.
    """


@dataclass(frozen=True)
class LaunchEnvironment:
    """The job a launcher started this process in, as its environment variables describe it."""

    world_size: int
    rank: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> LaunchEnvironment | None:
        """The launcher's job, or None when ``WORLD_SIZE`` and ``RANK`` are both unset (no launcher).

        ``LOCAL_RANK`` (the device of a CUDA process, modulo the devices it sees) defaults to ``RANK``.

        Raises:
            LaunchError: Some of :data:`LAUNCHER_VARIABLES` set but not all, or not valid.
        """
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return None
        missing = [k for k in LAUNCHER_VARIABLES if not env.get(k)]
        if missing:
            given = ", ".join(f"{k}={env[k]}" for k in LAUNCHER_VARIABLES if env.get(k))
            raise LaunchError(f"environment: {given} but {', '.join(missing)} not set; a launcher (torchrun, deepspeed) "
                              f"sets {', '.join(LAUNCHER_VARIABLES)} together")
        values: dict[str, int] = {}
        for key in ("WORLD_SIZE", "RANK", "MASTER_PORT", "LOCAL_RANK"):
            raw = env.get(key, env["RANK"])
            try:
                values[key] = int(raw)
            except ValueError:
                raise LaunchError(f"environment: {key}={raw!r} is not an integer") from None
        world, rank = values["WORLD_SIZE"], values["RANK"]
        if world < 1 or not 0 <= rank < world:
            raise LaunchError(f"environment: RANK={rank} with WORLD_SIZE={world}; expected 0 <= RANK < WORLD_SIZE")
        return cls(world, rank, values["LOCAL_RANK"], env["MASTER_ADDR"], values["MASTER_PORT"])


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_layout(world_size: int, tp: int, data_parallel: int | None = None) -> int:
    """The data-parallel size of ``world_size`` processes at tensor-parallel size ``tp``.

    Args:
        world_size: Processes in the job.
        tp: ``parallel.tensor_parallel``.
        data_parallel: ``parallel.data_parallel`` when given as a number (None: ``auto``).

    Raises:
        LaunchError: ``tp`` does not divide the world size, or ``data_parallel`` disagrees with it.
    """
    if tp < 1 or world_size % tp:
        raise LaunchError(f"parallel.tensor_parallel: {tp} does not divide the {world_size} process(es) of this job; "
                          f"start a multiple of {tp} with a launcher (torchrun --nproc-per-node, deepspeed --num_gpus)")
    dp = world_size // tp
    if data_parallel is not None and data_parallel != dp:
        raise LaunchError(f"parallel.data_parallel: {data_parallel}, but this job has {world_size} process(es) / "
                          f"tensor_parallel {tp} = {dp}; start {data_parallel * tp} processes or set data_parallel: auto")
    return dp


def initialize(tp: int = 1, *, seed: int = DEFAULT_SEED, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise megatron-core's parallel state on the existing default process group.

    Args:
        tp: Tensor-parallel size; must divide the world size (the rest is data parallel).
        seed: Seed of megatron's RNG tracker streams.
        timeout_s: Timeout of the collectives on the TP and DP groups megatron creates.

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
    # megatron's groups get their own timeout (30 min by default), not the default group's.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, distributed_timeout_minutes=timeout_s / 60)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_process_group(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> LaunchEnvironment | None:
    """Create the default process group if there is none: from the launcher's environment
    (``env://``) when there is one, else a one-process group on a free local port.

    Args:
        timeout_s: How long a collective waits for its peers before failing; it bounds how
            long the survivors of a dead rank wait when the launcher does not stop them.

    Returns:
        The launcher's job, or None outside a launcher.

    Raises:
        LaunchError: A partial or invalid launcher environment.
    """
    launched = LaunchEnvironment.detect()
    if dist.is_initialized():
        return launched
    timeout = datetime.timedelta(seconds=timeout_s)
    if launched is None:
        dist.init_process_group(backend=_backend(), init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0,
                                world_size=1, timeout=timeout)
        return None
    if torch.cuda.is_available():
        # Before the group exists, so NCCL binds this rank's communicator to its own device.
        torch.cuda.set_device(launched.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=_backend(), init_method="env://", timeout=timeout)
    return launched


def ensure_initialized(tp: int = 1, *, seed: int = DEFAULT_SEED, data_parallel: int | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Make megatron parallel state usable, creating the default process group if there is none
    (:func:`init_process_group`: the launcher's job, or one process).

    Safe to call repeatedly. With an existing process group this is :func:`initialize`.

    Args:
        tp: ``parallel.tensor_parallel``.
        seed: Seed of megatron's RNG tracker streams.
        data_parallel: ``parallel.data_parallel`` when given as a number (None: ``auto``, the
            world size divided by ``tp``).
        timeout_s: ``parallel.timeout_s``, for the groups created here.

    Raises:
        LaunchError: The layout does not fit the job (raised on every rank alike).
        RuntimeError: Parallel state already initialised with a different TP size.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        launched = LaunchEnvironment.detect()
        # Before the rendezvous: a wrong layout stops every rank at once instead of after
        # waiting for processes (on other nodes) that may never come.
        check_layout(1 if launched is None else launched.world_size, tp, data_parallel)
        init_process_group(timeout_s=timeout_s)
    if not parallel_state.model_parallel_is_initialized():
        check_layout(dist.get_world_size(), tp, data_parallel)
        initialize(tp, seed=seed, timeout_s=timeout_s)
        return
    apply_cpu_compat()
    current = parallel_state.get_tensor_model_parallel_world_size()
    if current != tp:
        raise RuntimeError(f"parallel state already initialised with tp={current}, asked for tp={tp}")
    check_layout(dist.get_world_size(), tp, data_parallel)


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
    """True on the process that writes files and prints progress: global rank 0, or the
    process a launcher started as ``RANK=0`` before its group exists, or a lone process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("0", "")


def peer_failure(exc: BaseException) -> str | None:
    """One line saying which collective of this rank failed because of another process, or None
    when ``exc`` is not such a failure.

    Such failures are torch's distributed errors (a rendezvous or store that timed out, an
    NCCL error) and gloo's transport errors (a peer closed its connection, or a receive timed
    out after ``parallel.timeout_s``); the process that caused them reports its own error.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        if isinstance(cause, dist.DistError) or (isinstance(cause, RuntimeError) and "/gloo/transport/" in text):
            first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
            # gloo prefixes the C++ source location and appends advice; the middle says what happened.
            return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically", 1)[0].rstrip(". ")
        cause = cause.__cause__ or cause.__context__
    return None


def barrier() -> None:
    """Barrier on the default group; a no-op without one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_TIMEOUT_S",
    "LAUNCHER_VARIABLES",
    "LaunchEnvironment",
    "LaunchError",
    "barrier",
    "check_layout",
    "destroy",
    "dp_rank",
    "dp_world_size",
    "ensure_initialized",
    "find_free_port",
    "init_process_group",
    "initialize",
    "is_global_rank_zero",
    "is_initialized",
    "peer_failure",
    "tp_group",
    "tp_rank",
    "tp_world_size",
]
