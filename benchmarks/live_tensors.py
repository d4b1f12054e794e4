"""Peak bytes of the tensors a piece of PyTorch code allocates: a figure that malloc cannot blur.

Peak RSS of a CPU process moves by ±100 MB between identical runs of the same step (glibc keeps
freed blocks, arenas fragment), which hides differences of a few per cent. This counts what the
code itself asks for: every storage an ATen op returns while the mode is active, from the op until
the tensor that owns it dies. Scratch memory inside a kernel is not seen, and a storage is let go
when the tensor that created it dies even if a view of it lives on, so the figure is a lower bound;
it is exact enough to compare two loops that run the same math.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: step()`` then ``live.peak``: the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._owned: dict[int, int] = {}

    def _release(self, pointer: int) -> None:
        self.current -= self._owned.pop(pointer, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in self._owned:  # a view or an in-place result is not a new allocation
                self._owned[pointer] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(value, self._release, pointer)
        return out
