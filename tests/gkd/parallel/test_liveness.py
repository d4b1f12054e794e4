"""Heartbeats in the job's store name the rank that stopped (the fast variant of the dead-rank
test in test_launch.py: one process, threads for ranks)."""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from gkd.parallel.liveness import INTERVAL_S, Heartbeat, describe_loss, silent_ranks
from gkd.parallel.state import LaunchEnvironment, find_free_port


def env(rank: int, port: int, world: int = 3) -> LaunchEnvironment:
    return LaunchEnvironment(world_size=world, rank=rank, local_rank=rank, master_addr="127.0.0.1", master_port=port)


def test_the_silent_rank_is_named_and_a_lost_store_is_told():
    port = find_free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    beats = [Heartbeat(env(r, port)) for r in (1, 2)]
    for beat in beats:
        beat.__enter__()
    try:
        time.sleep(3 * INTERVAL_S)
        assert describe_loss(env(0, port)).startswith("another process (every rank still sends heartbeats")
        beats[1].__exit__(None, None, None)  # rank 2 stops, as a killed process would
        started = time.monotonic()
        assert describe_loss(env(0, port)) == "rank 2 (no heartbeat for 2 s)"
        assert time.monotonic() - started < 10
    finally:
        for beat in beats:
            beat.__exit__(None, None, None)
    assert silent_ranks(env(0, port)).ranks == [1, 2]
    del master  # the store's holder is gone
    started = time.monotonic()
    found = silent_ranks(env(1, port))
    assert found.store_lost and time.monotonic() - started < 2
    assert describe_loss(env(1, port)) == f"rank 0 (the job's store at 127.0.0.1:{port} no longer answers)"


def test_heartbeat_is_a_no_op_outside_a_launched_job():
    with Heartbeat(None) as beat:
        assert beat._thread is None
    with Heartbeat(env(0, find_free_port(), world=1)) as beat:
        assert beat._thread is None
    assert describe_loss(None) == "another process"
