"""The runtime method API: what a method does at every iteration.

A method is an ``nn.Module`` (so its trainable parameters — TinyBERT's ``W_h``, an RL-KD
agent — live in the auxiliary model and are optimised, sharded and checkpointed with the
student). Each step the engine asks it for a *plan* per forward pass, runs the models with
the merged plans of all selected methods, and hands each method exactly the features it
asked for. One step, for every method ``m``::

    state = states[m]                          # explicit, JSON-serialisable, checkpointed
    p = 0
    while (plan := m.plan(step, state, p, previous)) is not None:
        ...engine merges plans of all methods for pass p and runs the models...
        terms = m.loss(step, state, p, outputs_for_m)   # {"hidden": tensor, ...}
        previous = outputs_for_m; p += 1
    m.after_step(step, state, logged_terms)

Nothing here reads global state: ``StepContext`` carries the stage, iteration, schedule
position and a generator seeded from (run seed, stage, iteration, method), so random choices
(random layers, Theseus replacement, DIITO spans) are reproducible and survive a resume
without storing RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gkd.errors import GkdError
from gkd.methods.checks import FeatureIssue
from gkd.models.taps import Operation

STUDENT = "student"


def teacher_key(name: str) -> str:
    """Model key of a teacher in plans and outputs: ``teacher:<name>``."""
    return f"teacher:{name}"


@dataclass(frozen=True)
class ModelShape:
    """What a method may know about a model before it is built.

    The first eight fields are always known (validation reads them from ``config.json``).
    ``head`` and ``has_pooler`` may be ``None`` for "unknown"; checks then assume the model has
    them.
    """

    family: str
    """``"encoder"`` or ``"decoder"``."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_labels: int | None = None
    """Classes of a classification head; ``None`` for other heads."""
    head: str | None = None
    """``"none"`` (no logits), ``"lm"``, ``"mlm"`` or ``"classification"``; ``None``: unknown."""
    has_pooler: bool | None = None
    """Whether the tap ``pooled`` exists (encoders with a pooler); ``None``: unknown."""
    attention_size: int | None = None
    """Width of the attention (``heads × head_dim``, the ``attention.context`` width) when it
    differs from ``hidden_size``: MobileBERT's inverted bottleneck (``intra_bottleneck_size``);
    ``None``: ``hidden_size``."""

    @property
    def head_dim(self) -> int:
        return (self.attention_size or self.hidden_size) // self.num_attention_heads

    @property
    def has_logits(self) -> bool | None:
        """Whether the model gives logits (a task head); ``None``: unknown."""
        return None if self.head is None else self.head != "none"

    @classmethod
    def from_model_config(cls, cfg: Any) -> ModelShape:
        """The shape of a :class:`gkd.models.ModelConfig` (every field known)."""
        labels = cfg.num_labels if cfg.head == "classification" else None
        attention = cfg.true_hidden_size if getattr(cfg, "is_mobilebert", False) else cfg.hidden_size
        return cls(cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads,
                   cfg.ffn_hidden_size, cfg.vocab_size, labels, head=cfg.head,
                   has_pooler=bool(cfg.family == "encoder" and cfg.add_pooler),
                   attention_size=None if attention == cfg.hidden_size else attention)


@dataclass(frozen=True)
class MethodContext:
    """Build-time facts handed to a method's constructor."""

    student: ModelShape
    teachers: Mapping[str, ModelShape]
    """The teachers this method reads, in config order (keys are teacher names)."""
    task: str
    stage_kind: str
    tensor_parallel: int = 1

    @property
    def teacher_names(self) -> list[str]:
        return list(self.teachers)


@dataclass(frozen=True)
class StepContext:
    """Where training is, given explicitly to every method call."""

    stage: str
    stage_index: int
    epoch: int
    iteration: int
    """0-based optimizer step within the stage."""
    total_iterations: int
    generator: torch.Generator
    """Seeded from (run seed, stage, iteration, method name): use it for every random choice."""

    @property
    def progress(self) -> float:
        """Fraction of the stage done, in [0, 1)."""
        return self.iteration / max(1, self.total_iterations)


@dataclass(frozen=True)
class ForwardRequest:
    """What a method needs from one model in one pass."""

    features: frozenset[str] = frozenset()
    operations: Mapping[str, Operation] = field(default_factory=dict)
    grad: bool = False
    """Teachers only: run with autograd (e.g. a method that backpropagates through a teacher)."""
    candidates: frozenset[str] = frozenset()
    """Teachers only: features this method may request in *other* iterations (random layer
    choices). A teacher cache (``cache: auto``) records them too when it runs the teacher, so
    the later iterations are served from it; without a cache they are not computed."""


@dataclass(frozen=True)
class PassPlan:
    """A method's requests for one forward pass, keyed by model (``student``, ``teacher:<name>``).

    A model a method does not mention is not run for it; the student always runs in pass 0.
    """

    models: Mapping[str, ForwardRequest]
    contributes_to_loss: bool = True
    """False: this pass's terms are logged and visible to later passes (``PassView.terms``)
    but not added to the optimised total (LRC-BERT's gradient-probe pass)."""

    @staticmethod
    def of(**by_model: ForwardRequest) -> PassPlan:
        return PassPlan(dict(by_model))


class ModelView:
    """One model's results of one pass, restricted to what the method requested.

    Args:
        features: The requested features by tap name.
        logits: The model's logits (see the attribute).
        task_loss, task_loss_per_example: The hard losses, when labels exist.
        hard_losses: Instead of the two values: a function giving them, called the first time one
            is read (the engine's views: a loss nobody reads is never computed).
    """

    def __init__(self, features: Mapping[str, torch.Tensor], logits: torch.Tensor | None,
                 task_loss: torch.Tensor | None = None, task_loss_per_example: torch.Tensor | None = None, *,
                 hard_losses: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> None:
        self.features = features
        self.logits = logits
        """``None`` for a model without a task head (a pre-trained teacher used for its features), and
        when every method planning the model in this pass requested ``logits.vocab_shard`` (the
        all-gather was skipped; the shard is in ``features``)."""
        self._hard: tuple[torch.Tensor | None, torch.Tensor | None] | None = (
            (task_loss, task_loss_per_example) if hard_losses is None else None)
        self._compute = hard_losses

    def _losses(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._hard is None:
            assert self._compute is not None
            self._hard, self._compute = self._compute(), None
        return self._hard

    @property
    def task_loss(self) -> torch.Tensor | None:
        """Task (hard) loss of this model on the batch, when labels exist: :func:`gkd.methods.losses.task_loss`
        (one mean over all labelled tokens of the batch; classification: over examples)."""
        return self._losses()[0]

    @task_loss.setter
    def task_loss(self, value: torch.Tensor | None) -> None:
        self._hard = (value, self._losses()[1])

    @property
    def task_loss_per_example(self) -> torch.Tensor | None:
        """``[b]``: :func:`gkd.methods.losses.task_loss_per_example` (for per-example weighting)."""
        return self._losses()[1]

    @task_loss_per_example.setter
    def task_loss_per_example(self, value: torch.Tensor | None) -> None:
        self._hard = (self._losses()[0], value)

    def restricted(self, names: Iterable[str]) -> ModelView:
        """This view with only the features ``names``; the hard losses are shared (computed once)."""
        return ModelView({n: self.features[n] for n in names}, self.logits, hard_losses=self._losses)

    def __repr__(self) -> str:
        return f"ModelView(features={sorted(self.features)}, logits={None if self.logits is None else tuple(self.logits.shape)})"


@dataclass
class PassView:
    batch: Mapping[str, torch.Tensor]
    """``input_ids``, ``attention_mask`` (1 = token, 0 = padding), and ``labels`` when present."""
    models: Mapping[str, ModelView]
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Filled by the engine after ``loss``: this method's terms of this pass, with their graph,
    so a later pass can differentiate them (e.g. w.r.t. a captured feature)."""

    @property
    def student(self) -> ModelView:
        return self.models[STUDENT]

    def teacher(self, name: str) -> ModelView:
        return self.models[teacher_key(name)]


def teacher_logits(outputs: PassView, teacher: str, method: str) -> torch.Tensor:
    """A teacher's logits from a method's view; :class:`GkdError` naming ``method`` and the fix
    when that teacher has no task head (a pre-trained teacher read for its features only)."""
    logits = outputs.teacher(teacher).logits
    if logits is None:
        raise GkdError(f"{method}: teacher '{teacher}' has no task head, so it gives no logits; fine-tune it first "
                       f"(a stage with 'train: teacher:{teacher}') or use a feature-based method")
    return logits


def raise_issues(issues: list[FeatureIssue]) -> None:
    """Raise :class:`GkdError` with the messages of ``issues`` (one per line); nothing when empty.

    For a constructor that re-checks its :meth:`Method.check` rules:
    ``raise_issues(type(self).check(config, context))``.
    """
    if issues:
        raise GkdError("\n".join(issue.message for issue in issues))


class Method(nn.Module):
    """Base class of runtime methods; subclasses set ``name`` and implement ``plan``/``loss``.

    Args:
        config: The method's config, validated against its schema and defaulted.
        context: Shapes of student and teachers, task and parallel layout.
    """

    name: str = ""

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Shape rules only this method knows, checked by config validation before any model
        is built (:func:`gkd.methods.checks.check_features`). Default: none.

        Return one :class:`~gkd.methods.checks.FeatureIssue` per problem, with ``field`` the
        config key that causes it (or ``None``) and a message naming the method, the model,
        the values and the fix. ``config`` is validated and defaulted. A constructor that
        cannot work with the shapes should raise :class:`GkdError` with the same message
        (:func:`raise_issues` does that).
        """
        return []

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        """What this method, with ``config``, must be the only one of its stage to do:
        ``{resource: config field}``. Default: nothing.

        Validation refuses a stage in which two methods claim the same resource, naming both
        methods and their fields. Resources in use: ``"hard_loss"`` (the gold-label term:
        keep one per stage), ``"operation:<tap>"`` (a method that must own the operation at
        a point), ``"forward:layers"`` (a method that replaces the layer stack).
        """
        return {}

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__()
        self.config = dict(config)
        self.context = context

    @property
    def teacher_name(self) -> str:
        """The teacher a single-teacher method reads: the first of ``context.teacher_names``."""
        return self.context.teacher_names[0]

    @property
    def teacher_shape(self) -> ModelShape:
        """That teacher's shape (``context.teachers[teacher_name]``)."""
        return self.context.teachers[self.teacher_name]

    def setup(self, models: Mapping[str, nn.Module]) -> None:
        """Called once the models exist (keys ``student``, ``teacher:<name>``). Keep references
        in a plain dict, never as sub-modules: teachers must not join the auxiliary model."""
        return None

    def initial_state(self) -> dict[str, Any]:
        """Per-method state at the start of a stage (JSON-serialisable; checkpointed)."""
        return {}

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int,
             previous: PassView | None) -> PassPlan | None:
        """Requests for pass ``pass_index``; return None to stop (pass 0 must return a plan)."""
        raise NotImplementedError

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int,
             outputs: PassView) -> dict[str, torch.Tensor]:
        """Named loss terms of this pass, unweighted; the engine multiplies them by the method
        entry's ``weight`` and logs them as ``<method>.<term>`` (``<method>.pass<p>.<term>`` for p > 0).

        A name with a ``/`` is a *part* of the term before it, for logging only: e.g.
        ``{"hidden": total, "hidden/2-4": pair}`` logs student layer 2 vs teacher layer 4 as
        ``<method>.hidden/2-4`` (TensorBoard/W&B group it under ``hidden``); the engine detaches
        parts and never adds them to the loss."""
        raise NotImplementedError

    def after_step(self, step: StepContext, state: dict[str, Any], terms: Mapping[str, float]) -> None:
        """Update ``state`` once the optimizer step is done (schedules, counters). Default: nothing."""
        return None
