"""Learning-rate schedules from a stage's ``schedule`` config: warm-up, then constant/linear/cosine.

The multiplier for optimizer step ``i`` (0-based; the scheduler is stepped after each
optimizer step) is

* warm-up (``i < W``): ``(i + 1) / W`` — the first step already trains, step ``W - 1`` reaches
  the peak;
* afterwards, with ``p = (i - W) / (T - W)`` clamped to [0, 1] and ``m = min_lr_ratio``:
  constant ``1``; linear ``m + (1 - m)(1 - p)``; cosine ``m + (1 - m)(1 + cos(pi p)) / 2``.

``W`` is ``warmup_steps`` when set, else ``ceil(warmup_ratio * T)``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from gkd.config.run import ScheduleConfig

SCHEDULE_TYPES = ("constant", "linear", "cosine")


class LRMultiplier:
    """The LR factor of a step. A callable object (not a closure) so that ``LambdaLR`` saves its
    plain-number attributes in its state dict, which stays JSON-serialisable."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        if kind not in SCHEDULE_TYPES:
            raise ValueError(f"unknown schedule type {kind!r} (expected one of {', '.join(SCHEDULE_TYPES)})")
        if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"invalid schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, "
                             f"min_lr_ratio={min_lr_ratio}")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def warmup_steps_for(schedule: ScheduleConfig, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` if given, else ``ceil(warmup_ratio * total_steps)``."""
    if schedule.warmup_steps is not None:
        return schedule.warmup_steps
    return math.ceil(schedule.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` for ``total_steps`` optimizer steps following ``schedule``.

    Args:
        optimizer: Its param groups' ``lr`` is the peak learning rate.
        schedule: Shape (constant|linear|cosine), warm-up and floor of the schedule.
        total_steps: Optimizer steps of the stage.
    """
    multiplier = LRMultiplier(schedule.type, warmup_steps_for(schedule, total_steps), total_steps, schedule.min_lr_ratio)
    return LambdaLR(optimizer, multiplier)
