"""Spawn a few local worker processes with gloo + megatron parallel state (tests, tools).

:func:`run_distributed` is the small launcher the TP tests use: it starts ``world_size``
processes (``spawn`` start method), joins them into one process group on a free local port,
initialises megatron's parallel state with the requested TP size, runs ``fn(*args)`` on every
rank and returns the per-rank results (anything ``torch.save`` can store).

``fn`` must be importable by the workers: a module-level function. Functions defined in test
files collected by pytest's ``importlib`` mode are found again through their source file.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from gkd.parallel.state import DEFAULT_SEED, destroy, find_free_port, initialize

FnRef = tuple[str, str, str]


class DistributedWorkerError(RuntimeError):
    """A worker of :func:`run_distributed` raised; the message leads with the first failure."""


def _reference(fn: Callable[..., Any]) -> FnRef:
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"run_distributed needs a module-level function, got {qualname!r}")
    return fn.__module__, qualname, inspect.getfile(fn)


def _resolve(ref: FnRef) -> Callable[..., Any]:
    module_name, qualname, path = ref
    module = None
    if module_name != "__main__":
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    if module is None or not hasattr(module, qualname.split(".")[0]):
        # pytest's importlib mode registers test modules under names that a fresh process
        # cannot import; load the file itself instead.
        unique = f"_gkd_worker_{abs(hash(path))}"
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} for worker function {qualname}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(
    rank: int,
    world_size: int,
    port: int,
    tp: int,
    seed: int,
    ref: FnRef,
    args: Sequence[Any],
    out_dir: str,
    threads: int,
    timeout_s: float,
    megatron: bool,
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        if megatron:
            initialize(tp, seed=seed)
        result = _resolve(ref)(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # Peers of a crashed rank fail too ("connection closed"); a timestamped traceback
        # lets the parent report the rank that failed first.
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(f"{time.time()}\n{traceback.format_exc()}")
        raise
    finally:
        if megatron:
            destroy()
        else:
            dist.destroy_process_group()


def _first_failure(out_dir: str, world_size: int) -> str | None:
    failures = []
    for r in range(world_size):
        path = Path(out_dir) / f"rank{r}.error"
        if path.is_file():
            stamp, _, tb = path.read_text().partition("\n")
            failures.append((float(stamp), r, tb))
    if not failures:
        return None
    failures.sort()
    _, rank, tb = failures[0]
    others = ", ".join(str(r) for _, r, _ in failures[1:])
    return f"rank {rank} failed first" + (f" (then ranks {others})" if others else "") + f":\n{tb}"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int | None = None,
    seed: int = DEFAULT_SEED,
    threads_per_rank: int = 1,
    timeout_s: float = 300.0,
    megatron: bool = True,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes and return each rank's result.

    Args:
        fn: Module-level function executed on every rank after parallel-state setup.
        world_size: Number of processes.
        *args: Picklable positional arguments passed to ``fn``.
        tp: Tensor-parallel size (default: ``world_size``).
        seed: Seed of megatron's RNG streams.
        threads_per_rank: ``torch.set_num_threads`` in each worker.
        timeout_s: Kill the workers and raise ``TimeoutError`` after this long.
        megatron: Initialise megatron parallel state (False: a bare gloo group, faster).

    Returns:
        ``[result_rank0, result_rank1, ...]``.

    Raises:
        DistributedWorkerError: a worker raised; the message holds the traceback of the
            rank that failed first.
        TimeoutError: the job did not finish in ``timeout_s``.
    """
    tp = world_size if tp is None else tp
    ref = _reference(fn)
    out_dir = tempfile.mkdtemp(prefix="gkd-dist-")
    try:
        ctx = mp.start_processes(
            _worker,
            args=(
                world_size,
                find_free_port(),
                tp,
                seed,
                ref,
                tuple(args),
                out_dir,
                threads_per_rank,
                timeout_s,
                megatron,
            ),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        if proc.is_alive():
                            proc.kill()
                    raise TimeoutError(f"run_distributed({ref[1]}) did not finish within {timeout_s:.0f}s")
        except ProcessException as exc:
            raise DistributedWorkerError(_first_failure(out_dir, world_size) or str(exc)) from exc
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


__all__ = ["DistributedWorkerError", "run_distributed"]
