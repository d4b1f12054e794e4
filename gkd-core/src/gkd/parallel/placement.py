"""Where tensors live: the one place that decides the run's device and the models' dtypes.

Every model (teachers and student), the methods' auxiliary parameters and every batch are
put on :attr:`Placement.device` by the engine through this class; nothing else in gkd calls
``.cuda()`` or picks a device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from gkd.errors import GkdError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Placement:
    """The run's device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU)."""

    device: torch.device

    @staticmethod
    def for_this_process() -> Placement:
        if torch.cuda.is_available():
            return Placement(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()))
        return Placement(torch.device("cpu"))

    def dtype(self, precision: str, what: str) -> torch.dtype:
        """The torch dtype of ``precision`` on this device; ``what`` names the config field in errors."""
        if precision == "fp16" and self.device.type == "cpu":
            raise GkdError(f"{what}: 'fp16' needs CUDA (this run is on the CPU); use 'bf16' or 'fp32'")
        return DTYPES[precision]

    def model(self, model: M, dtype: torch.dtype | None = None) -> M:
        """``model`` on the run's device (and in ``dtype`` when given)."""
        return model.to(device=self.device, dtype=dtype) if dtype is not None else model.to(self.device)

    def batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the run's device (a no-op on the CPU)."""
        if self.device.type == "cpu":
            return dict(batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


__all__ = ["DTYPES", "Placement"]
