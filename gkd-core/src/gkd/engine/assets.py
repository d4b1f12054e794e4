"""The run's assets, built once from the typed config: tokenizer, label vocabulary, datasets,
teachers and the student, each on the run's device (:class:`gkd.parallel.placement.Placement`).

This is the one place that turns checkpoint directories into models: teachers are frozen,
in eval mode, in their configured dtype and loaded once per checkpoint directory; every
student starts through :meth:`RunAssets.build_student`. A teacher with ``offload: cpu|disk``
keeps its parameters off the device between its forward passes
(:mod:`gkd.parallel.offload`); one with ``partition: data_parallel`` keeps 1/DP of them on each
data-parallel rank (:mod:`gkd.parallel.teacher_partition`). The model handed to the step is
still an ordinary model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from gkd.config.run import DatasetConfig, RunConfig, StudentInit, published_partition, strongest_offload
from gkd.engine.build import model_shape
from gkd.engine.data import TaskDataset, build_dataset, describe_split
from gkd.engine.labels import LabelVocab
from gkd.engine.readers import DataError
from gkd.errors import GkdError
from gkd.methods.api import ModelShape
from gkd.models import GkdModel, ModelConfig, Tokenizer, build_model, from_pretrained, load_model_config
from gkd.models.checkpoint import SafetensorsDir, load_hf_weights
from gkd.models.init import pretrained_student, random_student, truncated_student
from gkd.parallel.offload import TeacherResidency, offload
from gkd.parallel.placement import Placement
from gkd.parallel.teacher_partition import TeacherPartition, partition


@dataclass
class TeacherSlot:
    """One teacher: its current checkpoint directory and, once loaded, the model of that directory."""

    path: Path
    dtype: str = "fp32"
    model: GkdModel | None = None
    offload: str = "none"
    """``teachers[].offload``: ``none``, ``cpu`` or ``disk``."""
    residency: TeacherResidency | None = None
    """Set when the loaded model is offloaded (it moves the parameters around each forward pass)."""
    partition: str = "none"
    """``teachers[].partition``: ``none`` or ``data_parallel``."""
    partitioned: TeacherPartition | None = None
    """Set when the loaded model is partitioned over more than one data-parallel rank."""


def _weight_files(path: Path) -> dict[str, tuple[int, int]]:
    """``{file name: (size, mtime_ns)}`` of the safetensors weights (and index) in ``path``."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())
            if p.is_file() and p.name.startswith("model") and ".safetensors" in p.name}


class _TensorByTensor(SafetensorsDir):
    """A :class:`SafetensorsDir` that maps its file for one tensor at a time (it overrides the
    handle cache of its base class): no mapping outlives the read of a tensor, so the file's pages
    do not add up in the process's memory while a teacher is read (only the parameters do)."""

    def _handle(self, name: str) -> Any:
        return safe_open(str(self._files[name]), framework="pt")


def checkpoint_reader(path: Path, label: str = "teacher") -> Callable[[nn.Module], None]:
    """What ``offload: disk`` calls before each forward pass: this TP rank's part of every
    parameter (:func:`gkd.models.load_hf_weights`), read again from the memory-mapped safetensors
    in ``path``, one tensor at a time.

    The weight files must not change during the run (a resume checks the teacher's sha256; this
    checks size and modification time at each read).
    """
    stamp = _weight_files(path)

    def reload(model: nn.Module) -> None:
        if _weight_files(path) != stamp:
            raise GkdError(f"{label}: its checkpoint {path} changed on disk during the run; an offloaded "
                           "('disk') teacher re-reads it at every forward pass, so it must stay as it was")
        load_hf_weights(model, _TensorByTensor(path), strict=True)  # type: ignore[arg-type]

    return reload


class RunAssets:
    """Lazily built, cached assets of one run (one instance per run; no global state).

    Args:
        run: The validated run config.
        placement: The run's device.
    """

    def __init__(self, run: RunConfig, placement: Placement) -> None:
        self.run = run
        self.placement = placement
        self.teachers = {t.name: TeacherSlot(t.path, t.dtype, offload=t.offload, partition=t.partition)
                         for t in run.teachers}
        self.published_offload = strongest_offload(t.offload for t in run.teachers)
        """The offload of a teacher published by a stage (``publish_as_teacher``): the strongest of ``teachers[]``."""
        self.published_partition = published_partition(run.teachers)
        """The partition of a published teacher: ``data_parallel`` when some teacher of ``teachers[]`` has it."""
        self.labels: LabelVocab | None = None
        self._tokenizer: Tokenizer | None = None
        self._datasets: dict[DatasetConfig, TaskDataset] = {}

    # ------------------------------------------------------------------ text

    def tokenizer_dir(self) -> Path:
        """Where the run's tokenizer comes from: the student's source (a teacher or a checkpoint)."""
        init = self.run.student.init
        if init.teacher is None and self.run.teachers:
            return self.teachers[self.run.teachers[0].name].path
        return init.source_dir(self.teacher_paths)

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.tokenizer_dir(), self.run.task.max_length)
        return self._tokenizer

    def dataset(self, ds: DatasetConfig) -> TaskDataset:
        """A tokenised split (read once per run). Classification labels come from ``data.train``."""
        if self.run.task.type == "sequence_classification" and self.labels is None and ds != self.run.train_data:
            self.dataset(self.run.train_data)
        if ds not in self._datasets:
            data, labels = build_dataset(ds, self.tokenizer(), self.run.task, seed=self.run.seed, labels=self.labels)
            if self.labels is None and labels is not None:
                declared = self.run.task.num_labels
                if declared is not None and declared != len(labels):
                    raise GkdError(f"task.num_labels is {declared}, but the training data has {len(labels)} "
                                   f"labels ({', '.join(labels.labels)})")
                self.labels = labels
            self._datasets[ds] = data
        return self._datasets[ds]

    def read_all_data(self) -> list[str]:
        """Read, check and tokenise every split the run uses — ``data.train``, each stage's
        training and evaluation split, ``data.test`` — so that a bad file stops the run before
        its first step; returns one log line per split (examples, blank lines skipped, texts cut)."""
        run = self.run
        splits: dict[DatasetConfig, str] = {run.train_data: "train"}
        for stage in run.stages:
            splits.setdefault(stage.train_data, f"train ({stage.name})")
            if stage.eval_data is not None:
                splits.setdefault(stage.eval_data, "eval" if stage.eval_data == run.eval_data else f"eval ({stage.name})")
        if run.test_data is not None:
            splits.setdefault(run.test_data, "test")
        lines = []
        for ds, role in splits.items():
            try:
                lines.append(describe_split(role, ds, self.dataset(ds)))
            except DataError as exc:
                raise type(exc)(f"data {role}: {exc}") from None
        return lines

    # ------------------------------------------------------------------ model configs

    def model_config(self, path: Path, **overrides: Any) -> ModelConfig:
        """The architecture in ``path`` with the task's head (and the run's labels)."""
        extra: dict[str, Any] = {}
        if self.run.task.head == "classification":
            if self.labels is None:
                self.dataset(self.run.train_data)
            assert self.labels is not None
            extra = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels.labels))}
        return load_model_config(path, head=self.run.task.head, **(extra | overrides))

    def teacher_config(self, path: Path) -> ModelConfig:
        """The task's head when the checkpoint has it; otherwise the checkpoint's own head (a
        pre-trained teacher without a task head still serves feature-based methods)."""
        own = load_model_config(path)
        if own.head != self.run.task.head:
            return own
        cfg = self.model_config(path)
        if own.head == "classification" and own.num_labels != cfg.num_labels:
            # Also checked by gkd validate for the configured teachers; this covers every path.
            raise GkdError(f"teacher checkpoint {path} has a classification head for {own.num_labels} labels, but the "
                           f"task has {cfg.num_labels} (labels of {self.run.train_data.path.name})")
        return cfg

    # ------------------------------------------------------------------ teachers

    @property
    def teacher_paths(self) -> dict[str, Path]:
        return {name: slot.path for name, slot in self.teachers.items()}

    def set_teacher_path(self, name: str, path: Path, dtype: str | None = None) -> None:
        """Point ``name`` at another checkpoint (fine-tuned, published); a loaded model is dropped.
        A fine-tuned teacher keeps its dtype, offload and partition; a published one is offloaded
        like :attr:`published_offload` and partitioned like :attr:`published_partition`."""
        slot = self.teachers.get(name)
        if slot is None or slot.path != path:
            self.teachers[name] = TeacherSlot(path, dtype or (slot.dtype if slot else "fp32"),
                                              offload=slot.offload if slot else self.published_offload,
                                              partition=slot.partition if slot else self.published_partition)

    def teacher(self, name: str) -> GkdModel:
        """The frozen teacher ``name`` in eval mode, on the run's device and in its dtype.

        With ``offload: cpu|disk`` its parameters are brought onto the device by its own forward
        pass only (:mod:`gkd.parallel.offload`). A ``disk`` teacher is built without weights and
        read once here (one tensor at a time), which checks the checkpoint as a resident teacher's
        load does; then it holds no parameter storage until it runs.

        With ``partition: data_parallel`` (and more than one data-parallel rank) the teacher is read
        into host memory, this rank's slice of each unit is kept (on the device, or on the host with
        ``offload: cpu``) and the rest is dropped: the whole TP shard never sits on the device.
        """
        slot = self.teachers[name]
        if slot.model is None:
            dtype = self.placement.dtype(slot.dtype, f"teachers[{name}].dtype")
            cfg = self.teacher_config(slot.path)
            label = f"teacher '{name}' (offload: {slot.offload})"
            if slot.partition != "none" and slot.offload == "disk":
                raise GkdError(f"teacher '{name}': partition '{slot.partition}' cannot be combined with offload "
                               "'disk'; use offload 'none' or 'cpu' with the partition")
            if slot.offload == "disk":
                model = build_model(cfg, init_weights=False, device="cpu")  # as from_pretrained builds it
                slot.residency = offload(model.requires_grad_(False).eval(), "disk", self.placement.device,
                                         dtype=dtype, reload=checkpoint_reader(slot.path, label), label=label)
                assert slot.residency is not None
                with slot.residency.hold():  # read once now: a checkpoint that does not fit fails here
                    pass
            else:
                model = from_pretrained(slot.path, cfg, strict=True, device="cpu", frozen=True)
                if slot.partition == "data_parallel":
                    slot.partitioned = partition(model, self.placement.device, dtype=dtype,
                                                 home=torch.device("cpu") if slot.offload == "cpu" else None,
                                                 label=f"teacher '{name}' (partition: data_parallel)")
                if slot.partitioned is None and slot.offload == "none":
                    model = self.placement.model(model, dtype)
                elif slot.partitioned is None:  # partitioned, 'cpu' only moved the slices' home (above)
                    slot.residency = offload(model, slot.offload, self.placement.device, dtype=dtype, label=label)
            slot.model = model
        return slot.model

    def teacher_shape(self, name: str) -> ModelShape:
        return model_shape(self.teacher_config(self.teachers[name].path))

    def trainable_teacher(self, name: str) -> GkdModel:
        """Teacher ``name`` with the task head, trainable (for a ``train: teacher:NAME`` stage)."""
        path = self.teachers[name].path
        model = from_pretrained(path, self.model_config(path), strict=False, device="cpu", seed=self.run.seed)
        return self.placement.model(model)

    # ------------------------------------------------------------------ the student

    def build_student(self, init: StudentInit) -> GkdModel:
        """The one way a student starts: pretrained / another run's export / truncated / random."""
        overrides = self.run.student.architecture.model_overrides()
        source = init.source_dir(self.teacher_paths)
        seed = self.run.seed
        if init.strategy in ("pretrained", "run"):
            model = pretrained_student(source, self.model_config(source, **overrides), seed=seed)
        else:
            layers: Any = list(init.layers) if isinstance(init.layers, tuple) else init.layers
            depth = len(layers) if isinstance(layers, list) else (init.num_layers or overrides.get("num_layers"))
            if depth is not None:
                overrides["num_layers"] = depth
            cfg = self.model_config(source, **overrides)
            model = (random_student(cfg, seed=seed) if init.strategy == "random"
                     else truncated_student(cfg, source, layers=layers, seed=seed))
        return self.placement.model(model)


__all__ = ["RunAssets", "TeacherSlot", "checkpoint_reader"]
