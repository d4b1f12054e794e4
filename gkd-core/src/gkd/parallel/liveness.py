"""Which rank of a launched job died: heartbeats in the job's rendezvous store.

A collective that fails because a peer went away says only that *some* connection closed (or
timed out after ``parallel.timeout_s``). To name the rank, every process of a launched job runs a
:class:`Heartbeat`: a daemon thread that increments its counter ``gkd/alive/<rank>`` in the job's
TCP store (``MASTER_ADDR:MASTER_PORT``: the one ``env://`` joins) every :data:`INTERVAL_S`. A
survivor calls :func:`silent_ranks`: the ranks whose counter did not move over a few intervals.
When the store itself no longer answers, the process holding it is gone: global rank 0 (plain
``env://``) or node 0's launcher (torchrun).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from gkd.parallel.state import LaunchEnvironment

INTERVAL_S = 0.5
"""How often a rank proves it is alive."""
SILENCE_INTERVALS = 4
"""A rank whose counter did not move for this many intervals is taken for dead."""
PREFIX = "gkd/alive/"


def _client(env: LaunchEnvironment, timeout_s: float) -> dist.Store:
    return dist.TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class Heartbeat:
    """While entered, this rank's counter in the job's store grows every :data:`INTERVAL_S`.

    A no-op outside a launched job of more than one process. The thread connects lazily (the store
    may not exist yet when the job starts) and never raises: liveness is advisory.
    """

    def __init__(self, env: LaunchEnvironment | None, connect_timeout_s: float = 600.0) -> None:
        self.env = env if env is not None and env.world_size > 1 else None
        self.connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.env is not None:
            self._thread = threading.Thread(target=self._beat, name="gkd-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * INTERVAL_S)

    def _beat(self) -> None:
        assert self.env is not None
        key = f"{PREFIX}{self.env.rank}"
        deadline = time.monotonic() + self.connect_timeout_s
        store = None
        while store is None and not self._stop.is_set() and time.monotonic() < deadline:
            try:
                store = _client(self.env, timeout_s=min(10.0, self.connect_timeout_s))
            except Exception:  # not up yet; retry
                self._stop.wait(INTERVAL_S)
        while store is not None and not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store is gone: nothing left to tell
                return
            self._stop.wait(INTERVAL_S)


@dataclass(frozen=True)
class Silence:
    """What :func:`silent_ranks` found."""

    ranks: list[int]
    """Ranks whose heartbeat stopped (this rank excluded)."""
    store_lost: bool
    """The job's store no longer answers: its holder (rank 0, or node 0's launcher) is gone."""


def _answers(env: LaunchEnvironment, timeout_s: float) -> bool:
    """Whether something listens at the store's address (a refused connection is known at once,
    where a store client would retry for its whole timeout)."""
    try:
        with socket.create_connection((env.master_addr, env.master_port), timeout=timeout_s):
            return True
    except OSError:
        return False


def silent_ranks(env: LaunchEnvironment, *, wait_s: float = SILENCE_INTERVALS * INTERVAL_S,
                 connect_timeout_s: float = 5.0) -> Silence:
    """The ranks of the job whose heartbeat does not move over ``wait_s`` seconds."""
    if not _answers(env, connect_timeout_s):
        return Silence([], store_lost=True)
    try:
        store = _client(env, connect_timeout_s)
        keys = [f"{PREFIX}{r}" for r in range(env.world_size)]
        before = [store.add(k, 0) for k in keys]
        time.sleep(wait_s)
        after = [store.add(k, 0) for k in keys]
    except Exception:
        return Silence([], store_lost=True)
    return Silence([r for r in range(env.world_size) if r != env.rank and before[r] == after[r]], store_lost=False)


def describe_loss(env: LaunchEnvironment | None) -> str:
    """Who this rank lost, for its one-line error: ``rank 1``, ``ranks 1, 3``, or what is known."""
    if env is None or env.world_size < 2:
        return "another process"
    found = silent_ranks(env)
    if found.store_lost:
        holder = "rank 0" if env.rank != 0 else "the launcher holding it"
        return f"{holder} (the job's store at {env.master_addr}:{env.master_port} no longer answers)"
    if not found.ranks:
        return "another process (every rank still sends heartbeats: one is stuck, not dead)"
    names = ", ".join(map(str, found.ranks))
    return f"rank{'s' if len(found.ranks) > 1 else ''} {names} (no heartbeat for {SILENCE_INTERVALS * INTERVAL_S:g} s)"


__all__ = ["INTERVAL_S", "Heartbeat", "Silence", "describe_loss", "silent_ranks"]
