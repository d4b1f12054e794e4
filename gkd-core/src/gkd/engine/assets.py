"""The run's assets, built once from the typed config: tokenizer, label vocabulary, datasets,
teachers and the student, each on the run's device (:class:`gkd.parallel.placement.Placement`).

This is the one place that turns checkpoint directories into models: teachers are frozen,
in eval mode, in their configured dtype and loaded once per checkpoint directory; every
student starts through :meth:`RunAssets.build_student`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.config.run import DatasetConfig, RunConfig, StudentInit
from gkd.engine.build import model_shape
from gkd.engine.data import TaskDataset, build_dataset
from gkd.engine.labels import LabelVocab
from gkd.errors import GkdError
from gkd.methods.api import ModelShape
from gkd.models import GkdModel, ModelConfig, Tokenizer, from_pretrained, load_model_config
from gkd.models.init import pretrained_student, random_student, truncated_student
from gkd.parallel.placement import Placement


@dataclass
class TeacherSlot:
    """One teacher: its current checkpoint directory and, once loaded, the model of that directory."""

    path: Path
    dtype: str = "fp32"
    model: GkdModel | None = None


class RunAssets:
    """Lazily built, cached assets of one run (one instance per run; no global state).

    Args:
        run: The validated run config.
        placement: The run's device.
    """

    def __init__(self, run: RunConfig, placement: Placement) -> None:
        self.run = run
        self.placement = placement
        self.teachers = {t.name: TeacherSlot(t.path, t.dtype) for t in run.teachers}
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
        return self.model_config(path) if own.head == self.run.task.head else own

    # ------------------------------------------------------------------ teachers

    @property
    def teacher_paths(self) -> dict[str, Path]:
        return {name: slot.path for name, slot in self.teachers.items()}

    def set_teacher_path(self, name: str, path: Path, dtype: str | None = None) -> None:
        """Point ``name`` at another checkpoint (fine-tuned, published); a loaded model is dropped."""
        slot = self.teachers.get(name)
        if slot is None or slot.path != path:
            self.teachers[name] = TeacherSlot(path, dtype or (slot.dtype if slot else "fp32"))

    def teacher(self, name: str) -> GkdModel:
        """The frozen teacher ``name`` in eval mode, on the run's device and in its dtype."""
        slot = self.teachers[name]
        if slot.model is None:
            dtype = self.placement.dtype(slot.dtype, f"teachers[{name}].dtype")
            model = from_pretrained(slot.path, self.teacher_config(slot.path), strict=True, device="cpu")
            model.requires_grad_(False)
            slot.model = self.placement.model(model.eval(), dtype)
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


__all__ = ["RunAssets", "TeacherSlot"]
