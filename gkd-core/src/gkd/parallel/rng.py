"""Every RNG stream a run depends on, seeded and saved in one place.

A run's randomness comes from Python's, NumPy's and torch's global generators (dropout,
initialisation) and from megatron-core's named streams (dropout inside tensor-parallel
regions). Methods never use these: they draw from the step's own generator.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping

import numpy as np
import torch


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    """A generator that depends only on ``seed`` and ``parts`` (stable across processes)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def seeded_permutation(n: int, seed: int, *parts: object) -> list[int]:
    return torch.randperm(n, generator=seeded_generator(seed, *parts)).tolist()


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed of a run's stage: stage 0 keeps the run's seed, later stages get their own, so a
    stage's randomness does not depend on what earlier stages drew (or whether they ran at all: a
    reused fine-tuned teacher, a resumed run)."""
    if stage_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/stage/{stage_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    """Same seed, same run: the global RNGs and megatron's named streams."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.get_cuda_rng_tracker().reset()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def megatron_rng_states() -> dict[str, list[int]]:
    """megatron's named RNG streams as JSON-able byte lists (for checkpoints)."""
    from megatron.core.tensor_parallel import random as mrandom

    return {name: state.tolist() for name, state in mrandom.get_cuda_rng_tracker().get_states().items()}


def restore_megatron_rng(states: Mapping[str, list[int]]) -> None:
    """Undo :func:`megatron_rng_states` (no-op for an empty mapping)."""
    from megatron.core.tensor_parallel import random as mrandom

    if states:
        mrandom.get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in states.items()})


__all__ = ["megatron_rng_states", "restore_megatron_rng", "seed_everything", "seeded_generator", "seeded_permutation",
           "stage_seed"]
