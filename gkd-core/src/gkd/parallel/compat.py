"""Let megatron-core run on a machine without CUDA.

megatron-core 0.16 assumes a GPU in a few places that gkd's models reach. This module
patches exactly those, and only when ``torch.cuda.is_available()`` is false; on a GPU
machine :func:`apply_cpu_compat` does nothing. It is idempotent and is called by
:func:`gkd.parallel.ensure_initialized` / :func:`gkd.parallel.initialize`, so user code
never needs to call it directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_APPLIED = False


def cpu_compat_applied() -> bool:
    """Whether the CPU patches are in effect in this process."""
    return _APPLIED


def apply_cpu_compat() -> bool:
    """Install the CPU patches if CUDA is absent; returns True when they are in effect."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False

    from megatron.core.tensor_parallel import random as mcore_random

    # 1. megatron allocates communication and scratch buffers with
    #    ``device=torch.cuda.current_device()``: the all-gather output in
    #    tensor_parallel.mappings._gather_along_last_dim / _gather_along_first_dim (used by
    #    gather_from_tensor_model_parallel_region for our logits), the weight-gradient
    #    buffers in tensor_parallel.layers, and RotaryEmbedding.get_emb moving inv_freq.
    #    On a CPU-only torch that call raises, so it must name the CPU instead.
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]

    # 2. model_parallel_cuda_manual_seed() fills the RNG tracker through
    #    CudaRNGStatesTracker.add(), which reads torch.cuda.get_rng_state(); attention
    #    dropout runs inside get_cuda_rng_tracker().fork(), which sets the CUDA state.
    #    The replacement keeps the same named streams on the CPU default generator, so
    #    the tensor-parallel dropout streams still differ per TP rank.
    mcore_random._CUDA_RNG_STATE_TRACKER = _make_tracker_class()()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _make_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """``CudaRNGStatesTracker`` whose named states live on the CPU default generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} is already tracked")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise KeyError(f"RNG state {name!r} was never added (call model_parallel_cuda_manual_seed)")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                restore = self.states_[outer_name] if outer_name != "default-rng" else outer_state
                torch.set_rng_state(restore)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


__all__ = ["apply_cpu_compat", "cpu_compat_applied"]
