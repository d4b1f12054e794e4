"""Teachers partitioned over the data-parallel ranks (``teachers[].partition: data_parallel``):
each DP rank keeps 1/DP of its tensor-parallel shard of a frozen teacher and the ranks gather
one unit at a time for the forward pass, ZeRO-3-inference style, so that a teacher larger than
the student's layout allows still fits.

A *unit* is a piece of the model whose parameters are materialised together:

==================  ==========================================================================
unit                parameters; gathered … / freed …
==================  ==========================================================================
``embeddings``      ``model.embeddings``; before its forward / after it
``layers.{i}``      ``model.layers[i]``; before its forward / after it
``head``            every other parameter (final norm, pooler, classifier, MLM / LM head);
                    before the first of these modules runs / when the model's forward returns,
                    because ``GkdModel`` reads head weights outside a sub-module call (a tied
                    or MobileBERT vocabulary projection assembles its weight in ``forward``)
``shared``          the word embeddings when the head reads them too (tied weights); held
                    with ``embeddings`` and with ``head``, stored once
==================  ==========================================================================

Each unit's parameters (per dtype) are laid out in one flat buffer, every parameter starting
at a 64-byte boundary, padded to a multiple of the DP size; rank ``r`` keeps the ``r``-th
equal slice. Gathering a unit is one ``all_gather`` over the data-parallel group (megatron's
``get_data_parallel_group()``: the ranks that hold the same TP shard) into a fresh buffer of
which the parameters become views; freeing drops the buffer. A module other than ``GkdModel``
is one unit, gathered for its whole forward.

Between forward passes the model's registered parameters are ``meta`` stand-ins (shape and
dtype, no storage), as with ``offload: disk``: parameter counts and shapes stay right, tied
weights stay tied, and a stray use of a released weight fails instead of computing garbage.
So at most the resident slices plus the units held at once (one layer; or embeddings + shared;
or head + shared) hold parameter storage on a rank.

Rules, enforced rather than assumed:

- **Collectives.** Every data-parallel rank must run a partitioned teacher's forward the same
  number of times, in the same order relative to other partitioned teachers. The step
  guarantees it (:func:`planned_on_some_rank`: ranks agree, per pass, on which partitioned
  teachers run; a rank whose own plan left one out runs it too and drops the result), and
  evaluation runs every teacher on every rank over the same batches. As a safety net each
  forward starts with a tiny all-gather of (teacher, forward count); a mismatch raises
  :class:`~gkd.errors.GkdError` on every rank instead of pairing the wrong collectives.
- **No autograd.** The gathered weights are freed after each unit, so a forward with gradients
  enabled raises :class:`~gkd.errors.GkdError` (like an offloaded teacher).
- **Only the model's own forward gathers.** A method that runs teacher modules from elsewhere
  (Theseus reads the teacher layers' parameters before calling them) is refused by
  ``gkd validate`` for a partitioned teacher.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gkd.errors import GkdError

META = torch.device("meta")
ALIGN_BYTES = 64
"""Every parameter starts at this alignment inside a gathered buffer, as a freshly allocated
tensor does: BLAS results may depend on the alignment of their operands (MKL's conditional
numerical reproducibility needs aligned data), and gathered weights must give bitwise the
results of resident ones."""
_ATTRIBUTE = "_gkd_teacher_partition"
"""Where :func:`partition` leaves the :class:`TeacherPartition` on the model (see :func:`partition_of`)."""


@dataclass
class _Flat:
    """The parameters of one unit that share a dtype, as one flat buffer split over the ranks."""

    dtype: torch.dtype
    numel: int
    """Elements of the whole buffer (padded: a multiple of the DP size)."""
    members: list[tuple[int, int]]
    """(index into ``TeacherPartition._params``, offset in the buffer) of each parameter."""
    chunk: torch.Tensor
    """This rank's slice, ``numel / world`` elements, where the resident weights live."""

    @property
    def full_bytes(self) -> int:
        return self.numel * self.chunk.element_size()


@dataclass
class _Unit:
    name: str
    params: list[int]
    slots: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    """Every registration (module, attribute, parameter index) of the unit's parameters."""
    flats: list[_Flat] = field(default_factory=list)
    holders: int = 0

    @property
    def full_bytes(self) -> int:
        return sum(f.full_bytes for f in self.flats)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _all_gather(out: torch.Tensor, local: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, local, group=group)


class TeacherPartition:
    """Keeps this rank's slice of a frozen model and gathers its units around their forward.

    Built by :func:`partition`; the engine keeps it next to the model (``TeacherSlot.partition``).

    Args:
        model: The frozen model holding its (TP-shard) weights, on any device; its parameters'
            storage is released here.
        group: The data-parallel process group the slices are spread over.
        device: The run's device: where units are gathered (and buffers kept).
        home: Where the resident slices live: ``device`` (default), or the host (``offload: cpu``
            with the partition: each slice is copied to the device just before its all-gather).
        dtype: The dtype the parameters are run in (default: their current one).
        label: Names the model in errors (e.g. ``teacher 'big' (partition: data_parallel)``).

    Attributes:
        forwards: Forward passes of the model so far.
        gathers: Units gathered so far.
        peak_gathered_bytes: The most parameter bytes gathered at once (beyond the resident slices).
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, device: torch.device, *,
                 home: torch.device | None = None, dtype: torch.dtype | None = None,
                 label: str = "teacher") -> None:
        self.model = model
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device(device)
        self.home = torch.device(home) if home is not None else self.device
        self.label = label
        self.forwards = 0
        self.gathers = 0
        self.peak_gathered_bytes = 0
        self._gathered_bytes = 0
        self._depth = 0
        self._head_open = False
        self._open: dict[int, list[_Unit]] = {}
        """Units held by a module call in progress, by ``id(module)`` (released by its forward hook)."""
        self._tag = zlib.crc32(label.encode())
        self._params: list[nn.Parameter] = []
        index: dict[int, int] = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) not in index:
                    index[id(p)] = len(self._params)
                    self._params.append(p)
        self._standins = [nn.Parameter(torch.empty_like(p, dtype=dtype or p.dtype, device=META), requires_grad=False)
                          for p in self._params]
        self.units, triggers = _plan_units(model, index)
        slots: dict[int, list[tuple[nn.Module, str, int]]] = {i: [] for i in range(len(self._params))}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    slots[index[id(p)]].append((module, key, index[id(p)]))
        for unit in self.units.values():  # one unit at a time: the host holds the model plus one flat buffer
            unit.slots = [s for i in unit.params for s in slots[i]]
            unit.flats = self._slice(unit, dtype)
            self._release(unit)
        for module in model.modules():  # buffers are small and stay on the device
            for key, buf in module._buffers.items():
                if buf is not None:
                    cast = dtype is not None and buf.is_floating_point()
                    module._buffers[key] = buf.to(self.device, dtype=dtype) if cast else buf.to(self.device)
        self._handles = [model.register_forward_pre_hook(self._model_before, prepend=True),
                         model.register_forward_hook(self._model_after, always_call=True)]
        for module, names, kind in triggers:
            units = [self.units[n] for n in names if n in self.units]
            if units:
                self._handles += [module.register_forward_pre_hook(self._before_hook(units, kind)),
                                  module.register_forward_hook(self._after_hook(), always_call=True)]
        setattr(model, _ATTRIBUTE, self)  # a plain attribute (not a sub-module): partition_of finds it

    # ------------------------------------------------------------------ layout

    def _slice(self, unit: _Unit, dtype: torch.dtype | None) -> list[_Flat]:
        """Lay the unit's parameters out flat (per dtype) and keep this rank's slice."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in unit.params:
            by_dtype.setdefault(dtype or self._params[i].dtype, []).append(i)
        flats = []
        for dt, members in by_dtype.items():
            align = max(1, ALIGN_BYTES // torch.empty((), dtype=dt).element_size())
            offsets, n = [], 0
            for i in members:
                offsets.append(n)
                n += _round_up(self._params[i].numel(), align)
            n = _round_up(max(n, 1), self.world * align)
            source = self._params[members[0]].device
            buffer = torch.zeros(n, dtype=dt, device=source)
            for i, off in zip(members, offsets, strict=True):
                p = self._params[i].detach()
                buffer[off:off + p.numel()].copy_(p.reshape(-1))
            size = n // self.world
            chunk = buffer[self.rank * size:(self.rank + 1) * size].to(self.home, copy=True)
            if self.home.type == "cpu" and self.device.type == "cuda":
                chunk = chunk.pin_memory()
            flats.append(_Flat(dt, n, list(zip(members, offsets, strict=True)), chunk))
        return flats

    # ------------------------------------------------------------------ figures

    @property
    def resident_bytes(self) -> int:
        """Bytes of this rank's slices (held between forward passes, in ``home``)."""
        return sum(f.chunk.numel() * f.chunk.element_size() for u in self.units.values() for f in u.flats)

    @property
    def full_bytes(self) -> int:
        """Bytes of the whole (TP-shard) model's parameters, as an unpartitioned teacher holds them."""
        return sum(s.numel() * s.element_size() for s in self._standins)

    def unit_bytes(self) -> dict[str, int]:
        """Bytes of each unit once gathered (alignment and DP padding included)."""
        return {name: unit.full_bytes for name, unit in self.units.items()}

    def largest_gathered_bytes(self) -> int:
        """The most bytes one trigger gathers at once: a layer, embeddings + shared, or head + shared."""
        shared = self.units["shared"].full_bytes if "shared" in self.units else 0
        sizes = [u.full_bytes + (shared if u.name in ("embeddings", "head") else 0)
                 for u in self.units.values() if u.name != "shared"]
        return max([*sizes, shared])

    # ------------------------------------------------------------------ hooks

    def _model_before(self, module: nn.Module, args: Any) -> None:
        self._depth += 1  # first, so that the always-called forward hook balances it even on error
        if torch.is_grad_enabled():
            raise GkdError(f"{self.label} is partitioned over the data-parallel ranks, but was asked to run with "
                           "autograd (a method's ForwardRequest(grad=True), or a call outside torch.no_grad()); a "
                           "partitioned teacher runs only without gradients: set its partition to 'none'")
        if self._depth == 1:
            self._check_same_forward()
            self.forwards += 1

    def _model_after(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._head_open:
            self._head_open = False
            self._drop(self._head_units())

    def _before_hook(self, units: list[_Unit], kind: str) -> Callable[[nn.Module, Any], None]:
        def before(module: nn.Module, args: Any) -> None:
            if kind == "head" and self._depth > 0:
                # held until the model's forward returns: GkdModel reads head weights between calls
                if not self._head_open:
                    self._hold(units)
                    self._head_open = True
                return
            self._open[id(module)] = units  # first: the always-called forward hook then balances a failed gather
            self._hold(units)

        return before

    def _after_hook(self) -> Callable[[nn.Module, Any, Any], None]:
        def after(module: nn.Module, args: Any, output: Any) -> None:
            units = self._open.pop(id(module), None)
            if units is not None:
                self._drop(units)

        return after

    def _head_units(self) -> list[_Unit]:
        return [self.units[n] for n in ("head", "shared") if n in self.units]

    def _check_same_forward(self) -> None:
        """All-gather (teacher, forward count): every rank must be in the same forward pass of
        the same teacher, or the collectives below would pair with the wrong peers."""
        mine = torch.tensor([self._tag, self.forwards], dtype=torch.int64, device=self.device)
        table = torch.empty(2 * self.world, dtype=torch.int64, device=self.device)
        _all_gather(table, mine, self.group)
        rows = table.view(self.world, 2).tolist()
        if any(row != rows[self.rank] for row in rows):
            seen = "; ".join(f"rank {r}: {'this teacher' if row[0] == self._tag else 'another teacher'}, "
                             f"forward #{row[1]}" for r, row in enumerate(rows))
            raise GkdError(f"{self.label}: the data-parallel ranks are not running the same teacher forward pass "
                           f"({seen}); a partitioned teacher must run on every data-parallel rank the same number "
                           "of times in the same order")

    # ------------------------------------------------------------------ gather / release

    def _hold(self, units: Iterable[_Unit]) -> None:
        for unit in units:
            unit.holders += 1
            if unit.holders == 1:
                self._gathered_bytes += unit.full_bytes
                self.peak_gathered_bytes = max(self.peak_gathered_bytes, self._gathered_bytes)
                self._gather(unit)

    def _drop(self, units: Iterable[_Unit]) -> None:
        for unit in units:
            unit.holders -= 1
            if unit.holders == 0:
                self._gathered_bytes -= unit.full_bytes
                self._release(unit)

    def _gather(self, unit: _Unit) -> None:
        for flat in unit.flats:
            local = flat.chunk.to(self.device, non_blocking=True)
            full = torch.empty(flat.numel, dtype=flat.dtype, device=self.device)
            _all_gather(full, local, self.group)
            for i, off in flat.members:
                standin = self._standins[i]
                self._params[i].data = full[off:off + standin.numel()].view(standin.shape)
        for module, key, i in unit.slots:
            module._parameters[key] = self._params[i]
        self.gathers += 1

    def _release(self, unit: _Unit) -> None:
        for i in unit.params:
            self._params[i].data = torch.empty(0, dtype=self._standins[i].dtype, device=self.device)
        for module, key, i in unit.slots:
            module._parameters[key] = self._standins[i]


def _plan_units(model: nn.Module, index: Mapping[int, int]) -> tuple[dict[str, _Unit], list[tuple[nn.Module, list[str], str]]]:
    """The units of ``model`` and what gathers them: ``[(module, unit names, kind)]``, kind
    ``own`` (held for that module's call) or ``head`` (held until the model's forward returns)."""
    def params_of(module: nn.Module) -> list[int]:
        return list(dict.fromkeys(index[id(p)] for p in module.parameters()))

    embeddings, layers = getattr(model, "embeddings", None), getattr(model, "layers", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        return {"model": _Unit("model", params_of(model))}, [(model, ["model"], "own")]
    shared = _read_by_head(model)
    shared_ids = {index[id(p)] for p in shared}
    units = {"shared": _Unit("shared", sorted(shared_ids)),
             "embeddings": _Unit("embeddings", [i for i in params_of(embeddings) if i not in shared_ids])}
    triggers: list[tuple[nn.Module, list[str], str]] = [(embeddings, ["embeddings", "shared"], "own")]
    placed = set(units["shared"].params) | set(units["embeddings"].params)
    for k, layer in enumerate(layers):
        units[f"layers.{k}"] = _Unit(f"layers.{k}", [i for i in params_of(layer) if i not in placed])
        placed |= set(units[f"layers.{k}"].params)
        triggers.append((layer, [f"layers.{k}"], "own"))
    units["head"] = _Unit("head", [i for i in params_of(model) if i not in placed])
    for child in model.children():
        if child is not embeddings and child is not layers:
            triggers.append((child, ["head", "shared"], "head"))
    return {n: u for n, u in units.items() if u.params}, triggers


def _read_by_head(model: nn.Module) -> list[nn.Parameter]:
    """Embedding parameters a ``GkdModel``'s output layer reads too (tied word embeddings)."""
    cfg = getattr(model, "model_config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    projects = any(getattr(model, name, None) is not None for name in ("lm_head", "mlm_decoder"))
    word = getattr(getattr(model, "embeddings", None), "word_embeddings", None)
    if tied and projects and isinstance(word, nn.Module) and isinstance(getattr(word, "weight", None), nn.Parameter):
        return [word.weight]
    return []


def data_parallel_group() -> tuple[int, dist.ProcessGroup | None]:
    """(size, group) of this rank's data-parallel group (megatron's); size 1 without a process group."""
    from gkd.parallel.state import is_initialized

    if not dist.is_initialized() or not is_initialized():
        return 1, None
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    return dist.get_world_size(group), group


def partition(model: nn.Module, device: torch.device, *, home: torch.device | None = None,
              dtype: torch.dtype | None = None, label: str = "teacher",
              group: dist.ProcessGroup | None = None) -> TeacherPartition | None:
    """Partition the frozen ``model`` over the data-parallel ranks (None, and nothing changed,
    when there is one data-parallel rank).

    Args:
        model: The frozen model, holding this TP rank's weights (on the host, so that the whole
            shard need not fit the device; only the slices and one unit at a time go there).
        device: The run's device.
        home: Where the slices live between forward passes (default ``device``; the host for
            ``offload: cpu``).
        dtype: The dtype the parameters are run in (default: their current one).
        label: Names the model in errors.
        group: The process group to spread over (default: megatron's data-parallel group).
    """
    if group is None:
        world, group = data_parallel_group()
        if world == 1:
            return None
    elif dist.get_world_size(group) == 1:
        return None
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{label}: only a frozen model (requires_grad False) can be partitioned")
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ValueError(f"{label}: already partitioned")
    return TeacherPartition(model, group, device, home=home, dtype=dtype, label=label)


def partition_of(model: nn.Module) -> TeacherPartition | None:
    """The :class:`TeacherPartition` installed on ``model``, if any."""
    found = getattr(model, _ATTRIBUTE, None)
    return found if isinstance(found, TeacherPartition) else None


def partitioned_keys(models: Mapping[str, nn.Module]) -> list[str]:
    """The keys of ``models`` whose model is partitioned, in the mapping's order (the same on
    every rank: the stage's teachers)."""
    return [key for key, model in models.items() if partition_of(model) is not None]


def planned_on_some_rank(keys: Sequence[str], planned: Collection[str], models: Mapping[str, nn.Module]) -> list[str]:
    """Those of the partitioned ``keys`` that some data-parallel rank plans to run in this pass
    (one all-reduce of a flag per key), in the order of ``keys``.

    Every rank must run a partitioned teacher in the same passes: a rank that left one out of
    its own plan (a plan that depends on its batch) runs it too, and drops the result.
    """
    if not keys:
        return []
    first = partition_of(models[keys[0]])
    assert first is not None
    flags = torch.tensor([key in planned for key in keys], dtype=torch.int32, device=first.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=first.group)
    return [key for key, flag in zip(keys, flags.tolist(), strict=True) if flag]


def partition_parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters held on this rank now: a partitioned model's slices plus
    the units gathered at the moment; any other model's parameters with storage."""
    found = partition_of(model)
    live: dict[int, int] = {}
    for p in model.parameters():
        if not p.is_meta and p.numel():
            storage = p.untyped_storage()
            live[storage.data_ptr()] = storage.nbytes()
    return sum(live.values()) + (found.resident_bytes if found is not None else 0)


__all__ = ["ALIGN_BYTES", "TeacherPartition", "data_parallel_group", "partition", "partition_of",
           "partition_parameter_bytes", "partitioned_keys", "planned_on_some_rank"]
