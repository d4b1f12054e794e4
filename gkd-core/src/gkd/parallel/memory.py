"""What a rank holds: the bytes of parameters, gradients, optimizer states and activations,
measured on the real objects of a run (the teachers, and the DeepSpeed engine of
:func:`gkd.parallel.zero.initialize_engine` around the student and auxiliary model).

Memory is counted by **storage**, never by tensor: DeepSpeed's ZeRO keeps parameters,
gradients and optimizer states in flat buffers of which the module's tensors are views, and
a view counted as a tensor would count its buffer many times. Every storage is counted once,
under the first of these categories that reaches it:

==================  ==========================================================================
category            storages
==================  ==========================================================================
``teachers``        the teachers' parameters: their TP shard, or this rank's slices of it
                    (``partition: data_parallel``); nothing between passes for ``offload: disk``
``student``         the student's and the methods' auxiliary parameters: the module's tensors,
                    or under ZeRO-3 each parameter's partition (``ds_tensor``) and whatever is
                    gathered at the moment
``optimizer``       the torch optimizer's state (AdamW's moments and step) and the fp32 master
                    partitions DeepSpeed steps on
``gradients``       ``.grad`` of the module's parameters and of the master partitions, and
                    DeepSpeed's gradient partitions (``averaged_gradients``, the ZeRO-3 flat
                    gradient buffer, the reduction bucket ``ipg_buffer``)
``buffers``         any other tensor the DeepSpeed optimizer holds (staging copies for
                    offload, norms)
==================  ==========================================================================

Each count is split by where the storage lives: ``device`` (an accelerator) or ``host`` (CPU
memory). On a CPU-only machine everything is host memory; :attr:`ModelStateBytes.optimizer_offloaded`
and :attr:`ModelStateBytes.optimizer_location` then still say where DeepSpeed keeps the optimizer
state (``offload_optimizer``), which a GPU run would show as host bytes.

Activations (:func:`measure_step_activations`) are the tensors autograd saves for the backward
pass of one :func:`gkd.engine.step.distill_step` (through
:func:`torch.autograd.graph.saved_tensors_hooks`) together with the features and logits the
methods are handed, again counted once per storage and without parameters.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

CATEGORIES = ("teachers", "student", "optimizer", "gradients", "buffers")

_MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
"""Where DeepSpeed keeps the fp32 master partitions (ZeRO 1/2, ZeRO-3, its bf16 optimizer); the
inner torch optimizer's param groups point at them only while it steps under ZeRO-3."""
_GRADIENT_ATTRIBUTES = ("averaged_gradients", "ipg_buffer", "grad_partitions_flat_buffer",
                        "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
"""Where DeepSpeed's ZeRO optimizers (stage 1/2 and 3) keep gradient partitions and buckets."""


@dataclass
class Placed:
    """Bytes on the accelerator (``device``) and in host memory (``host``)."""

    device: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host


@dataclass
class ModelStateBytes:
    """One rank's model-state memory, by category (see the module docstring)."""

    teachers: Placed = field(default_factory=Placed)
    student: Placed = field(default_factory=Placed)
    """Student and auxiliary (method) parameters."""
    optimizer: Placed = field(default_factory=Placed)
    gradients: Placed = field(default_factory=Placed)
    buffers: Placed = field(default_factory=Placed)
    zero_stage: int = 0
    optimizer_offloaded: bool = False
    """DeepSpeed's own flag: ``zero_optimization.offload_optimizer`` is in effect."""
    optimizer_location: str = ""
    """The device DeepSpeed allocates the optimizer state on (``cpu`` when offloaded)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{category: {"device", "host", "total"}, ...}`` plus the ZeRO facts."""
        out: dict[str, Any] = {c: asdict(getattr(self, c)) | {"total": getattr(self, c).total} for c in CATEGORIES}
        return out | {"zero_stage": self.zero_stage, "optimizer_offloaded": self.optimizer_offloaded,
                      "optimizer_location": self.optimizer_location}


def _key(t: torch.Tensor) -> tuple[str, int] | None:
    """Identity of ``t``'s storage (None: no storage, e.g. ``meta`` or an empty ZeRO-3 stand-in)."""
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return str(t.device), storage.data_ptr()


class _Ledger:
    """Counts each storage once, under the category that reaches it first."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.totals = {c: Placed() for c in CATEGORIES}

    def add(self, category: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = _key(t)
        if key is None or key in self.seen:
            return
        self.seen.add(key)
        placed = self.totals[category]
        if t.device.type == "cpu":
            placed.host += t.untyped_storage().nbytes()
        else:
            placed.device += t.untyped_storage().nbytes()


def _tensors(obj: Any, depth: int = 3, *, grads: bool = True) -> Iterator[torch.Tensor]:
    """Tensors inside nested lists, tuples and dicts (and, with ``grads``, their ``.grad``)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        if grads and obj.grad is not None:
            yield obj.grad
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth - 1, grads=grads)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1, grads=grads)


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the moments (DeepSpeed's ZeRO optimizers wrap one)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer or a DeepSpeed optimizer wrapping one, got {type(optimizer).__name__}")
    return inner


def measure_model_state(optimizer: Any, student: nn.Module, teachers: Iterable[nn.Module] = (), *,
                        zero_stage: int = 0) -> ModelStateBytes:
    """Bytes of this rank's teachers, student (+ auxiliary) parameters, gradients, optimizer
    states and DeepSpeed buffers, at the moment of the call.

    Call it after ``engine.backward`` and before ``engine.step`` of a step that is not the first
    (the optimizer states exist from the previous step, the gradients from this backward): that
    is when all of them are alive at once.

    Args:
        optimizer: The optimizer :func:`gkd.parallel.zero.initialize_engine` returned (a torch
            optimizer under ZeRO 0, DeepSpeed's ZeRO optimizer otherwise).
        student: The module DeepSpeed wraps (student and auxiliary model).
        teachers: The frozen teachers of the stage.
        zero_stage: The ZeRO stage (reported as is).
    """
    from gkd.parallel.teacher_partition import partition_of

    ledger = _Ledger()
    for teacher in teachers:
        found = partition_of(teacher)
        if found is not None:  # its slices (the parameters are meta stand-ins between forward passes)
            for unit in found.units.values():
                for flat in unit.flats:
                    ledger.add("teachers", flat.chunk)
        for p in teacher.parameters():
            ledger.add("teachers", p)
    params = list(student.parameters())
    for p in params:
        ledger.add("student", getattr(p, "ds_tensor", None))
        ledger.add("student", p)  # under ZeRO-3: only what is gathered now (or a persistent parameter)
    inner = _inner_optimizer(optimizer)
    for state in inner.state.values():
        for t in _tensors(state, grads=False):
            ledger.add("optimizer", t)
    masters = [p for group in inner.param_groups for p in group["params"]]
    if optimizer is not inner:
        masters += [t for name in _MASTER_ATTRIBUTES for t in _tensors(getattr(optimizer, name, None), depth=1, grads=False)]
    for p in masters:
        ledger.add("optimizer", p)  # a master partition (the module's own parameters are counted above)
    for p in params:
        ledger.add("gradients", p.grad)
    for p in masters:
        ledger.add("gradients", p.grad)
    if optimizer is not inner:
        attributes = vars(optimizer)
        for name in _GRADIENT_ATTRIBUTES:
            for t in _tensors(attributes.get(name)):
                ledger.add("gradients", t)
        for value in attributes.values():
            for t in _tensors(value):
                ledger.add("buffers", t)
    offloaded = bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))
    # DeepSpeed's own allocation device (ZeRO-3 names it with an enum), else where the moments are
    device = getattr(optimizer, "device", None) or next((t.device for t in _tensors(list(inner.state.values()))), "")
    location = str(getattr(device, "value", device))
    return ModelStateBytes(**ledger.totals, zero_stage=zero_stage, optimizer_offloaded=offloaded,
                           optimizer_location=location)


# ---------------------------------------------------------------------------------- activations


@dataclass
class ActivationBytes:
    """Memory of one forward pass and its losses, before the backward."""

    saved: int
    """Tensors saved for the backward pass (parameters excluded)."""
    features: int
    """Features and logits handed to the methods that no saved tensor already holds."""

    @property
    def total(self) -> int:
        return self.saved + self.features


class _Recording:
    """Stands in for a model in :func:`gkd.engine.step.distill_step`: runs it and keeps what the
    methods are handed (captured features, logits) until the measurement."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kept: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:  # setup(), layers, … of the real model
        return getattr(self.model, name)

    @contextlib.contextmanager
    def capture(self, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        with self.model.capture(**kwargs) as captured:  # type: ignore[operator]
            yield captured
        self.kept.extend(captured.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if getattr(out, "logits", None) is not None:
            self.kept.append(out.logits)
        return out


def measure_step_activations(models: Mapping[str, nn.Module], methods: Mapping[str, Any], contexts: Mapping[str, Any],
                             batch: Mapping[str, torch.Tensor]) -> tuple[Any, ActivationBytes]:
    """Run one :func:`gkd.engine.step.distill_step` and measure its activation memory.

    Returns the step's result (call ``backward`` on its loss as usual) and the bytes of the
    tensors saved for the backward pass plus the features and logits of every model, each
    storage once, parameters excluded. Features of every pass are kept to the end of the step,
    so a method with several passes is counted as if all of them were alive together.
    """
    from gkd.engine.step import distill_step

    params = {k for m in models.values() for p in m.parameters() if (k := _key(p)) is not None}
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    recordings = {k: _Recording(m) for k, m in models.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = distill_step(recordings, methods, contexts, batch)  # type: ignore[arg-type]
    seen = set(params)
    totals = [0, 0]
    alive = [t for ref in saved if (t := ref()) is not None]
    kept = [t for r in recordings.values() for t in r.kept]
    for i, tensors in enumerate((alive, kept)):
        for t in tensors:
            key = _key(t)
            if key is not None and key not in seen:
                seen.add(key)
                totals[i] += t.untyped_storage().nbytes()
    return result, ActivationBytes(saved=totals[0], features=totals[1])


# ---------------------------------------------------------------------------------- one training step


@dataclass
class StepMemory:
    """One rank's memory in a training step: model states and activations."""

    state: ModelStateBytes
    activations: ActivationBytes
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict(), "activations": asdict(self.activations) | {
            "total": self.activations.total}, "loss": self.loss}


def measure_training_step(student: nn.Module, teachers: Mapping[str, nn.Module], methods: Mapping[str, Any],
                          batch: Mapping[str, torch.Tensor], *, zero: Any, precision: str = "fp32",
                          optimizer: Any = None) -> StepMemory:
    """Memory of a distillation step as ``gkd distill`` runs it, on this rank.

    Wraps ``student`` and the methods' auxiliary parameters in the DeepSpeed engine gkd builds
    (:func:`gkd.parallel.zero.deepspeed_config`, :func:`gkd.parallel.zero.initialize_engine`),
    takes one optimizer step so that the optimizer states exist, then measures the second step:
    its activations (:func:`measure_step_activations`) and, after its backward, the model states
    (:func:`measure_model_state`).

    Args:
        student: The student, built for this rank's TP group.
        teachers: ``{name: model}``, frozen.
        methods: ``{name: SelectedMethod}`` of the stage (``setup`` is called here).
        batch: This rank's micro-batch.
        zero: A :class:`gkd.config.run.ZeroConfig`.
        precision: ``training.precision``.
        optimizer: A :class:`gkd.config.run.OptimizerConfig` (default: its defaults).
    """
    from gkd.config.run import OptimizerConfig
    from gkd.engine.loop import Trainable
    from gkd.engine.step import distill_step, step_context
    from gkd.methods.api import STUDENT, teacher_key
    from gkd.parallel.state import dp_world_size
    from gkd.parallel.zero import deepspeed_config, initialize_engine

    models: dict[str, nn.Module] = {STUDENT: student} | {teacher_key(n): m for n, m in teachers.items()}
    for sel in methods.values():
        sel.method.setup(models)
    auxiliary = nn.ModuleDict({name: sel.method for name, sel in methods.items()})
    config = deepspeed_config(micro_batch=next(iter(batch.values())).shape[0], grad_accum=1, max_grad_norm=1.0,
                              precision=precision, zero=zero, data_parallel=dp_world_size())
    engine, ds_optimizer, _ = initialize_engine(Trainable(student, auxiliary), optimizer or OptimizerConfig(),
                                                lambda opt: None, config)
    student.train()
    contexts = {name: step_context(0, "memory", 0, 0, 0, 2, name) for name in methods}
    engine.backward(distill_step(models, methods, contexts, batch).loss)
    engine.step()
    contexts = {name: step_context(0, "memory", 0, 0, 1, 2, name) for name in methods}
    result, activations = measure_step_activations(models, methods, contexts, batch)
    engine.backward(result.loss)
    state = measure_model_state(ds_optimizer, engine.module, teachers.values(), zero_stage=zero.stage)
    engine.step()
    return StepMemory(state, activations, float(result.loss.detach()))


__all__ = ["CATEGORIES", "ActivationBytes", "ModelStateBytes", "Placed", "StepMemory", "measure_model_state",
           "measure_step_activations", "measure_training_step"]
