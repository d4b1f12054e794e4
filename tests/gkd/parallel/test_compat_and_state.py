"""CPU compatibility patches and single-process initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gkd import parallel

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches apply only without CUDA")


@cpu_only
def test_cpu_compat_is_idempotent_and_patches_what_megatron_needs() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    assert parallel.apply_cpu_compat() is True
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    assert parallel.apply_cpu_compat() is True and mcore_random._CUDA_RNG_STATE_TRACKER is tracker
    assert parallel.cpu_compat_applied()
    assert torch.cuda.current_device() == torch.device("cpu")
    # megatron's own buffer helper allocates on "the current CUDA device".
    from megatron.core.tensor_parallel.mappings import _gather_along_last_dim

    parallel.ensure_initialized()
    x = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(_gather_along_last_dim(x, parallel.tp_group()), x)


@cpu_only
def test_cpu_rng_tracker_forks_named_streams() -> None:
    from megatron.core import tensor_parallel

    parallel.ensure_initialized()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the model-parallel stream advanced
    with pytest.raises(KeyError, match="never added"), tracker.fork("no-such-stream"):
        pass
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("model-parallel-rng", 99)


def test_ensure_initialized_is_idempotent_and_checks_tp() -> None:
    parallel.ensure_initialized(tp=1)
    group = dist.group.WORLD
    parallel.ensure_initialized(tp=1)
    assert dist.group.WORLD is group and dist.get_world_size() == 1
    assert parallel.is_initialized() and parallel.tp_world_size() == 1 and parallel.tp_rank() == 0
    assert parallel.is_global_rank_zero()
    with pytest.raises(RuntimeError, match=r"already initialised with tp=1, asked for tp=2"):
        parallel.ensure_initialized(tp=2)
    with pytest.raises(RuntimeError, match="already initialised"):
        parallel.initialize(tp=2)
    parallel.barrier()


def test_find_free_port_is_bindable() -> None:
    import socket

    port = parallel.find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_library_use_leaves_torch_and_megatron_alone(tmp_path) -> None:
    """Importing gkd, its public modules and checking a config patch nothing and import no
    megatron-core: the CPU patches arrive only with the first megatron model or parallel state."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[3] / "examples" / "reuters-minilm" / "config.yaml"
    code = f"""
import sys, torch
original = torch.cuda.current_device
import gkd, gkd.methods, gkd.models, gkd.config
from gkd.config import load_run_config
run = load_run_config({str(example)!r})
print("megatron.core" in sys.modules)
import gkd.engine.trainer, gkd.testing  # importing the engine patches nothing either
assert torch.cuda.current_device is original, "torch.cuda.current_device was patched"
from gkd.parallel import cpu_compat_applied
assert not cpu_compat_applied()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", "checking a config imported megatron-core"
