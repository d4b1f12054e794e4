"""The typed run config: one frozen dataclass per section. Build it with
:func:`gkd.config.load_run_config` (or :func:`gkd.config.build_run_config`).

The JSON Schema (``run.schema.json``, printed by ``gkd config schema``) is the source of the
fields' documentation and defaults; these classes give the engine typed, immutable access to
a config that has already passed every check. Every field is read by the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gkd.config.resolve import HEAD_FOR_TASK

Precision = Literal["fp32", "bf16", "fp16"]
Offload = Literal["none", "cpu", "disk"]
Partition = Literal["none", "data_parallel"]
TaskType = Literal["sequence_classification", "masked_lm", "causal_lm"]
LayerChoice = Literal["bottom", "strided"]


@dataclass(frozen=True)
class TaskConfig:
    """``task``: what the student (and a fine-tuned teacher) is trained to do."""

    type: TaskType
    max_length: int = 128
    """Tokens per example after truncation."""
    num_labels: int | None = None
    """Classes of a classification task; None: taken from the training split."""
    mlm_probability: float = 0.15
    """Masking rate of ``masked_lm``."""

    @property
    def head(self) -> str:
        """The model head this task trains (``classification``, ``mlm`` or ``lm``)."""
        return HEAD_FOR_TASK[self.type]


@dataclass(frozen=True)
class DatasetConfig:
    """One data split (``data.train`` …, or a stage's ``data``)."""

    path: Path
    format: str = "auto"
    text_field: str = "text"
    label_field: str = "label"
    limit: int | None = None
    """Use only the first N examples after a seeded shuffle."""


@dataclass(frozen=True)
class TeacherConfig:
    """One entry of ``teachers``."""

    name: str
    path: Path
    dtype: Precision = "fp32"
    """Precision the frozen teacher is loaded and run in."""
    offload: Offload = "none"
    """Where its parameters stay between its forward passes (:mod:`gkd.parallel.offload`)."""
    partition: Partition = "none"
    """``data_parallel``: each data-parallel rank keeps 1/DP of its TP shard, gathered unit by unit for
    the forward pass (:mod:`gkd.parallel.teacher_partition`)."""


OFFLOAD_ORDER: tuple[Offload, ...] = ("none", "cpu", "disk")
"""``teachers[].offload`` values, from keeping the teacher on the device to keeping it on disk."""


def strongest_offload(modes: Iterable[str]) -> Offload:
    """The offload of a teacher published by a stage (``publish_as_teacher``): the strongest one
    among ``teachers[]`` (``none`` without teachers), so an assistant never needs more device
    memory than the configured teachers were allowed."""
    return max((m for m in modes if m in OFFLOAD_ORDER), key=OFFLOAD_ORDER.index, default="none")  # type: ignore[return-value]


def published_partition(teachers: Iterable[TeacherConfig]) -> Partition:
    """The partition of a teacher published by a stage: ``data_parallel`` when some teacher of
    ``teachers[]`` is partitioned and the published offload (:func:`strongest_offload`) is not
    ``disk`` (which holds nothing to partition)."""
    teachers = list(teachers)
    if strongest_offload(t.offload for t in teachers) == "disk":
        return "none"
    return "data_parallel" if any(t.partition == "data_parallel" for t in teachers) else "none"


@dataclass(frozen=True)
class StudentInit:
    """``student.init`` (or a stage's ``student_init``): how a student starts."""

    strategy: Literal["pretrained", "truncate", "random", "run"]
    path: Path | None = None
    """Checkpoint directory (``pretrained``, or ``random``'s shape), or run directory (``run``)."""
    teacher: str | None = None
    """Teacher copied from (``truncate``) or whose shape is used (``random``)."""
    layers: LayerChoice | tuple[int, ...] = "strided"
    """Teacher layers copied by ``truncate``: bottom k, every (T/S)-th from layer 0, or a list."""
    num_layers: int | None = None

    def source_dir(self, teacher_paths: dict[str, Path]) -> Path:
        """The checkpoint directory this init reads its shape (and tokenizer) from."""
        if self.teacher is not None:
            return teacher_paths[self.teacher]
        assert self.path is not None  # validation guarantees one of teacher / path
        return self.path / "export" if self.strategy == "run" else self.path


@dataclass(frozen=True)
class ArchitectureOverrides:
    """``student.architecture``: shape fields that replace the source checkpoint's."""

    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    """Defaults to ``num_attention_heads`` when only that is given (no grouped-query attention)."""
    ffn_hidden_size: int | None = None

    def model_overrides(self) -> dict[str, int]:
        """As :class:`gkd.models.ModelConfig` keyword arguments."""
        out = {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
               "num_attention_heads": self.num_attention_heads, "ffn_hidden_size": self.ffn_hidden_size,
               "num_kv_heads": self.num_kv_heads if self.num_kv_heads is not None else self.num_attention_heads}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class StudentConfig:
    init: StudentInit
    architecture: ArchitectureOverrides = field(default_factory=ArchitectureOverrides)


@dataclass(frozen=True)
class MethodEntry:
    """One method selected in a stage, with its config already defaulted and validated."""

    name: str
    weight: float
    teachers: tuple[str, ...]
    config: dict[str, Any]


@dataclass(frozen=True)
class OptimizerConfig:
    type: Literal["adamw"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleConfig:
    type: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    """Overrides ``warmup_ratio`` when given."""
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 16
    """Micro-batch size per data-parallel rank."""
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    precision: Precision = "fp32"
    eval_every_steps: int = 0
    """Evaluate on the stage's eval split every N stage steps (0: at the end only)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss, a loss term or the gradient norm is NaN/inf: ``stop`` the run (exit 1, no
    checkpoint of it), or ``skip`` its update (ZeRO stage 0, fp32 only)."""
    max_skipped_steps: int = 10
    """``skip``: how many steps a run may skip; the next non-finite step stops it."""
    early_stopping: EarlyStopping | None = None
    """End the stage when periodic evaluations stop improving; None: off."""


@dataclass(frozen=True)
class EarlyStopping:
    """``training.early_stopping``: ``patience`` evaluations without an improvement larger than
    ``min_delta`` of ``metric`` end the stage."""

    patience: int
    metric: Literal["auto", "accuracy", "perplexity", "loss"] = "auto"
    min_delta: float = 0.0

    @classmethod
    def from_raw(cls, value: Mapping[str, Any] | None) -> EarlyStopping | None:
        return None if value is None else cls(int(value["patience"]), value.get("metric", "auto"),
                                              float(value.get("min_delta", 0.0)))


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False

    def to_deepspeed_dict(self) -> dict[str, Any]:
        """The ``zero_optimization`` section of a DeepSpeed config; the only place it is built."""
        out: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer:
            out["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_param:
            out["offload_param"] = {"device": "cpu", "pin_memory": False}
        return out


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    data_parallel: int | Literal["auto"] = "auto"
    """Data-parallel ranks the launched job must have; ``auto``: world size / ``tensor_parallel``."""
    timeout_s: float = 600.0
    """How long a collective waits for the other processes before failing."""

    @property
    def expected_data_parallel(self) -> int | None:
        """``data_parallel`` as a number, None for ``auto``."""
        return None if self.data_parallel == "auto" else int(self.data_parallel)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save every N global steps (0: only at the end of each stage, which always saves)."""
    keep_last: int = 2
    resume: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    """A text progress line every N steps when no progress bar is shown (0: none)."""
    progress: bool = True
    """A progress bar when standard error is a terminal."""
    plot: bool = True
    tensorboard: bool = False
    """Also write the metrics as TensorBoard event files under ``<run_dir>/tensorboard``."""
    wandb: WandbConfig | None = None
    """Also log the metrics to a Weights & Biases run; None: off."""


@dataclass(frozen=True)
class WandbConfig:
    """``logging.wandb``: where the W&B run goes."""

    project: str = "gkd"
    mode: str = "offline"
    """``"offline"`` (files under ``<run_dir>/wandb``) or ``"online"``."""
    tags: tuple[str, ...] = ()

    @classmethod
    def from_raw(cls, value: bool | Mapping[str, Any] | None) -> WandbConfig | None:
        """The config of ``logging.wandb`` (``true``, ``false`` or its options)."""
        if not value:
            return None
        options = value if isinstance(value, Mapping) else {}
        return cls(options.get("project", "gkd"), options.get("mode", "offline"), tuple(options.get("tags", ())))


@dataclass(frozen=True)
class CacheConfig:
    """``cache``: the teacher-output cache (:mod:`gkd.engine.teacher_cache`); a stage's ``cache``
    overrides ``mode``."""

    mode: Literal["off", "auto", "required"] = "off"
    """``off``, ``auto`` (serve what may be served) or ``required`` (stop when a stage's teacher
    request may not be served)."""
    precision: Literal["exact", "compressed"] = "exact"
    """``exact`` (the teacher's dtype) or ``compressed``."""
    dir: Path | None = None
    """None: ``GKD_CACHE_DIR`` or the user's cache directory."""
    top_k: int = 32
    """``compressed``: logits kept per position."""
    dtype: Literal["fp16", "bf16"] = "fp16"
    """``compressed``: dtype of floating features."""

    @staticmethod
    def mode_of(value: str | bool) -> Literal["off", "auto", "required"]:
        """A mode as written: YAML reads a bare ``off`` as false, so false is ``off`` and true ``auto``."""
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value  # type: ignore[return-value]

    @classmethod
    def from_raw(cls, value: str | bool | Mapping[str, Any], base: Path | None = None) -> CacheConfig:
        """The config of ``cache`` (a mode, or its options); a relative ``dir`` is against ``base``."""
        if not isinstance(value, Mapping):
            return cls(mode=cls.mode_of(value))
        options = {**value, "mode": cls.mode_of(value.get("mode", "auto"))}
        if "dir" in options:
            path = Path(options["dir"]).expanduser()
            options["dir"] = path if path.is_absolute() or base is None else base / path
        return cls(**options)


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    dir: Path | None = None
    """Default ``<run_dir>/export``."""
    onnx: Literal["none", "fp32", "int8"] = "none"
    """Also export ``model.onnx`` (:mod:`gkd.deploy`) and evaluate it on the test split."""


@dataclass(frozen=True)
class AnalysisConfig:
    """``analysis``: teacher-student feature distances recorded during training, read by
    ``gkd analyze`` (:mod:`gkd.engine.analysis`, :mod:`gkd.analysis`). Off unless ``every`` > 0."""

    every: int = 0
    """Record every N global steps of the student stages, and at the start and end of each; 0: off."""
    probe_examples: int = 64
    """The first N examples of the probe split: the fixed batch the distances are measured on."""
    probe_split: Literal["auto", "eval", "test", "train"] = "auto"
    """Where the probe comes from; ``auto``: ``data.eval``, else ``data.test``, else ``data.train``."""
    batch_size: int = 16
    """Probe examples per forward pass of the analysis."""
    metric: Literal["split", "probe"] = "split"
    """The task metric at each point: on the whole probe split, or on the probe examples only."""
    teachers: tuple[str, ...] | None = None
    """Teachers measured against; None: every teacher a stage may use."""
    layer_map: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None
    """Teacher layer (0-based) of each student layer, for every teacher or per teacher name; None:
    ``round((i+1)·T/S) − 1``."""
    temperatures: tuple[float, ...] = (1.0, 5.0, 10.0, 15.0, 20.0)
    """Temperatures of the soft-label KL."""

    @property
    def enabled(self) -> bool:
        return self.every > 0


@dataclass(frozen=True)
class StageConfig:
    """One stage, with the top-level ``optimizer``/``schedule``/``training``/``data`` merged in."""

    name: str
    kind: Literal["pretrain", "task"]
    train: str
    """``"student"`` or ``"teacher:NAME"``."""
    teachers: tuple[str, ...]
    """Teachers the stage may use (default: every teacher defined or published before it)."""
    methods: tuple[MethodEntry, ...]
    steps: int | None
    epochs: float | None
    train_data: DatasetConfig
    eval_data: DatasetConfig | None
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    training: TrainingConfig
    publish_as_teacher: str | None
    student_init: StudentInit | None
    cache: Literal["off", "auto", "required"] | None = None
    """This stage's cache mode; None: the top-level ``cache.mode``."""

    @property
    def trains_teacher(self) -> str | None:
        return self.train.split(":", 1)[1] if self.train.startswith("teacher:") else None

    @property
    def used_teachers(self) -> tuple[str, ...]:
        """Teachers some method of this stage reads, in first-use order (these are loaded)."""
        return tuple(dict.fromkeys(t for m in self.methods for t in m.teachers))


@dataclass(frozen=True)
class RunConfig:
    name: str
    run_dir: Path
    seed: int
    task: TaskConfig
    teachers: tuple[TeacherConfig, ...]
    student: StudentConfig
    stages: tuple[StageConfig, ...]
    parallel: ParallelConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    export: ExportConfig
    analysis: AnalysisConfig
    train_data: DatasetConfig
    """``data.train``: the default training split of every stage, and the source of the label set."""
    eval_data: DatasetConfig | None
    """``data.eval``: the default evaluation split of every stage."""
    test_data: DatasetConfig | None
    source: Path | None
    raw: dict[str, Any]
    cache: CacheConfig = CacheConfig()
    """``cache``: the teacher-output cache."""
    """The fully defaulted config as a plain mapping (saved next to every checkpoint)."""

    def cache_mode(self, stage: StageConfig) -> str:
        """The cache mode of ``stage``: its own ``cache``, else the top-level one."""
        return stage.cache or self.cache.mode

    def teacher(self, name: str) -> TeacherConfig:
        return next(t for t in self.teachers if t.name == name)

    def stage_index(self, stage: StageConfig) -> int:
        return self.stages.index(stage)
