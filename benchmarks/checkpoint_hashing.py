"""What the sha256 of every checkpoint file costs, side by side.

A checkpoint the size of the main job's student with AdamW (17.4 M parameters as a 17-layer
1024-wide MLP: 199 MiB of weights and moments) is saved with and without hashing in alternating
rounds (with first in even rounds, without first in odd ones, so a busy spell of a shared machine
hits both), then verified (sizes + hashes, what a resume does) and loaded. Reported: the median and
min–max of each over the rounds and the ratios.

    python benchmarks/checkpoint_hashing.py [--rounds 7] [--workdir DIR]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scratch import scratch_dir
from torch import nn

from gkd.engine import checkpoint as ckpt
from gkd.engine.checkpoint import CheckpointState, load_checkpoint, save_checkpoint, verify_checkpoint


def student_sized() -> nn.Module:
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)], nn.Linear(1024, 608))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = student_sized()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    root = scratch_dir("gkd-hash-", args.workdir)
    hashing = ckpt._sha256_files
    step = 0

    def save(with_hashes: bool) -> float:
        nonlocal step
        step += 1
        ckpt._sha256_files = hashing if with_hashes else (lambda paths: {p.name: "" for p in paths})
        try:
            return timed(lambda: save_checkpoint(root, CheckpointState(global_step=step), model=model,
                                                 optimizer=optimizer, keep_last=1))
        finally:
            ckpt._sha256_files = hashing

    with_h: list[float] = []
    without: list[float] = []
    for r in range(args.rounds):
        for hashed in ((True, False) if r % 2 == 0 else (False, True)):
            (with_h if hashed else without).append(save(hashed))
    save(True)
    path = ckpt.find_latest(root)
    assert path is not None
    size = sum(f.stat().st_size for f in path.iterdir())
    verify = [timed(lambda: verify_checkpoint(path)) for _ in range(args.rounds)]
    other, other_opt = student_sized(), None
    other_opt = torch.optim.AdamW(other.parameters())
    load = [timed(lambda: load_checkpoint(path, model=other, optimizer=other_opt, restore_rng=False, verify=False))
            for _ in range(args.rounds)]
    a, b = statistics.median(with_h), statistics.median(without)
    print(f"{params / 1e6:.1f}M parameters + AdamW, checkpoint {size / 2**20:.0f} MiB, {args.rounds} alternating rounds")
    print(f"save without hashes  {spread(without)}")
    print(f"save with hashes     {spread(with_h)}   ratio {a / b:.2f}×")
    print(f"verify (size+sha256) {spread(verify)}   {size / 2**20 / statistics.median(verify):.0f} MiB/s")
    print(f"load (no verify)     {spread(load)}   verify/load {statistics.median(verify) / statistics.median(load):.2f}×")


if __name__ == "__main__":
    main()
