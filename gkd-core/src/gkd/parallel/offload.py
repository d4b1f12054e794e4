"""Teachers that need not all fit: a frozen model's parameters kept off the run's device between
its forward passes (``teachers[].offload``), so that device memory is bounded by the largest
teacher, not by the sum of the teachers.

=======  ===============================================================================
mode     where the parameters are between forward passes
=======  ===============================================================================
``none`` on the run's device (nothing is installed; the default)
``cpu``  in host memory (pinned under CUDA); each forward pass copies them onto the device and
         drops the device copy afterwards. The teacher is frozen, so nothing is copied back.
         On a CPU-only run the device *is* host memory and ``cpu`` changes nothing.
``disk`` nowhere: the model's parameters are ``meta`` stand-ins (shape and dtype, no storage).
         Before each forward pass ``reload`` reads the parameters again (the engine passes a
         reader of the checkpoint's memory-mapped safetensors that reads only this TP rank's
         shard), and afterwards the storage is dropped, so host memory is bounded too.
=======  ===============================================================================

The model stays an ordinary module: :func:`offload` installs a forward pre-hook (bring the
parameters in) and an always-called forward hook (send them back), so the step, evaluation
and every method call the teacher as usual. Shapes, dtypes and parameter counts stay right
between forward passes, and tied weights stay tied (one stand-in per Parameter).

Limits, enforced rather than assumed:

- Only the model's own forward brings the parameters in. A method that calls the teacher's
  sub-modules from elsewhere (Theseus runs teacher layers inside the student's forward) is
  refused by ``gkd validate`` for an offloaded teacher; a ``disk`` teacher's ``meta``
  parameters make such a call fail rather than compute with missing weights.
- An offloaded teacher runs without autograd: autograd would keep references to parameters
  whose data is dropped after the forward. A forward with gradients enabled raises
  :class:`~gkd.errors.GkdError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gkd.errors import GkdError

META = torch.device("meta")


class TeacherResidency:
    """Moves a frozen model's parameters onto the device for each forward pass and off afterwards.

    Built by :func:`offload`; the engine keeps it next to the model (``TeacherSlot.residency``).

    Args:
        model: The frozen model. ``cpu``: its parameters hold the weights (on the host or the
            device). ``disk``: their values are never read; only shapes and dtypes are kept.
        mode: ``cpu`` or ``disk``.
        device: The run's device.
        dtype: The dtype the parameters are run in (default: their current one).
        reload: ``disk``: fills the model's parameters (already allocated on ``device``) from the
            checkpoint; called before each forward pass.
        label: Names the model in errors (e.g. ``teacher 'big' (offload: disk)``).

    Attributes:
        loads: How many times the parameters were brought onto the device (for tests and logs).
    """

    def __init__(self, model: nn.Module, mode: str, device: torch.device, *, dtype: torch.dtype | None = None,
                 reload: Callable[[nn.Module], None] | None = None, label: str = "teacher") -> None:
        if mode not in ("cpu", "disk"):
            raise ValueError(f"offload mode {mode!r} is not one of 'cpu', 'disk'")
        if mode == "disk" and reload is None:
            raise ValueError("offload 'disk' needs a reload function")
        self.model = model
        self.mode = mode
        self.device = torch.device(device)
        self.label = label
        self.loads = 0
        self._reload = reload
        self._depth = 0
        self._params: list[nn.Parameter] = []
        """Each Parameter of the model once (a tied weight is one Parameter)."""
        self._slots: list[tuple[nn.Module, str, int]] = []
        """Every registration (module, attribute, index into ``_params``)."""
        index: dict[int, int] = {}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    if id(p) not in index:
                        index[id(p)] = len(self._params)
                        self._params.append(p)
                    self._slots.append((module, key, index[id(p)]))
        if mode == "cpu":  # the host copy, in the run's dtype; the parameters' own data is dropped below
            pinned = self.device.type == "cuda"
            self._home = [_host_copy(p.detach() if dtype is None else p.detach().to(dtype), pinned)
                          for p in self._params]
            self._standins: list[nn.Parameter] = []
        else:  # nothing is read: shape and dtype live on in a meta stand-in of each parameter
            self._home = []
            self._standins = [nn.Parameter(torch.empty_like(p, dtype=dtype or p.dtype, device=META),
                                           requires_grad=False) for p in self._params]
        for module in model.modules():  # buffers are small and always resident
            for key, buf in module._buffers.items():
                if buf is not None:
                    cast = dtype is not None and buf.is_floating_point()
                    module._buffers[key] = buf.to(self.device, dtype=dtype) if cast else buf.to(self.device)
        self._release()
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]

    # ------------------------------------------------------------------ state

    @property
    def resident(self) -> bool:
        """Whether the parameters are on the device now (inside a forward pass or :meth:`hold`)."""
        return self._depth > 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[nn.Module]:
        """Keep the parameters on the device for several forward passes (e.g. a whole evaluation)."""
        try:
            self._enter()
            yield self.model
        finally:
            self._exit()

    # ------------------------------------------------------------------ hooks

    def _before(self, module: nn.Module, args: Any) -> None:
        self._enter()  # first, so that the always-called forward hook balances it even on error
        if torch.is_grad_enabled():
            raise GkdError(f"{self.label} is offloaded, but was asked to run with autograd (a method's "
                           "ForwardRequest(grad=True), or a call outside torch.no_grad()); an offloaded teacher "
                           "runs only without gradients: set its offload to 'none'")

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        self._exit()

    def _enter(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._load()

    def _exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._release()

    # ------------------------------------------------------------------ moves

    def _load(self) -> None:
        self.loads += 1
        if self.mode == "cpu":
            for p, home in zip(self._params, self._home, strict=True):
                p.data = home.to(self.device, non_blocking=True)
            return
        for module, key, i in self._slots:
            module._parameters[key] = self._params[i]
        for p, meta in zip(self._params, self._standins, strict=True):
            p.data = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        assert self._reload is not None
        self._reload(self.model)

    def _release(self) -> None:
        if self.mode == "cpu":
            for p, home in zip(self._params, self._home, strict=True):
                p.data = home
            return
        for p in self._params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for module, key, i in self._slots:
            module._parameters[key] = self._standins[i]
        _return_freed_host_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: other C libraries, other systems)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _return_freed_host_memory() -> None:
    """Give the memory of dropped parameters back to the operating system.

    glibc serves allocations of up to 32 MiB from its heap and keeps what is freed there, so
    without this a ``disk`` teacher's released parameters (on a CPU run, its host memory) would
    stay in the process's resident memory (in the benchmark of docs/benchmarks.md, peak RSS 1,375
    instead of about 1,020 MiB). ``malloc_trim(0)`` returns the free heap pages; it takes
    milliseconds per call and is part of the ``disk`` step time measured there.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _host_copy(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    host = t.to("cpu")
    return host.pin_memory() if pinned else host


def offload(model: nn.Module, mode: str, device: torch.device, *, dtype: torch.dtype | None = None,
            reload: Callable[[nn.Module], None] | None = None, label: str = "teacher") -> TeacherResidency | None:
    """Install offloading on the frozen ``model`` (``mode`` ``none``: nothing, returns None).

    Args:
        model: The frozen model. ``cpu``: its parameters hold the weights (on the host or the
            device; they end up on the host). ``disk``: their values are never read (build the
            model without initialising it); the first forward pass, or :meth:`TeacherResidency.hold`,
            reads the checkpoint.
        mode: ``none``, ``cpu`` or ``disk``.
        device: The run's device.
        dtype: The dtype the parameters are run in (default: their current one).
        reload: ``disk``: fills the parameters, allocated on ``device``, from the checkpoint.
        label: Names the model in errors.
    """
    if mode == "none":
        return None
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{label}: only a frozen model (requires_grad False) can be offloaded")
    return TeacherResidency(model, mode, device, dtype=dtype, reload=reload, label=label)


def parameter_bytes(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Bytes of ``model``'s parameters that hold storage now (on ``device`` when given); a
    disk-offloaded teacher between forward passes holds none."""
    where = torch.device(device) if device is not None else None
    total = 0
    for p in model.parameters():
        if p.is_meta or (where is not None and (p.device.type != where.type or
                                                 where.index not in (None, p.device.index))):
            continue
        total += p.numel() * p.element_size()
    return total


__all__ = ["TeacherResidency", "offload", "parameter_bytes"]
