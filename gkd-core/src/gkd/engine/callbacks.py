"""Training callbacks, in the style of ``transformers.TrainerCallback`` and Lightning's
``Callback``: subclass :class:`Callback`, override the events you need, pass instances to
``gkd.distill(..., callbacks=[...])`` (or ``Trainer(..., callbacks=[...])``).

Callbacks observe; they do not steer the run. They are called on global rank 0 only (under a
launcher every rank trains, one reports), after the event's record is in ``metrics.jsonl``.
An exception in a callback stops the run as a :class:`CallbackError` naming the callback
and the event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd.errors import GkdError

if TYPE_CHECKING:
    from gkd.config.run import StageConfig
    from gkd.engine.evaluate import Evaluation


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as logged to ``metrics.jsonl`` (``kind: train``)."""

    stage: str
    """The stage's name."""
    step: int
    """Optimizer step within the stage (from 1)."""
    global_step: int
    """Optimizer step across the run's stages (from 1)."""
    loss: float
    """The weighted total loss, averaged over gradient accumulation and data-parallel ranks."""
    terms: Mapping[str, float]
    """Every loss term, ``method.term`` (e.g. ``tinybert.hidden``), averaged the same way."""
    lr: float
    """Learning rate of the first parameter group after the step."""


class Callback:
    """Base class of training callbacks; every event is a no-op here."""

    def on_stage_start(self, stage: StageConfig) -> None:
        """A stage starts training (also when a run resumes inside it)."""

    def on_step_end(self, info: StepInfo) -> None:
        """An optimizer step ended."""

    def on_evaluate(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Stage ``stage`` was evaluated at its step ``step``; ``metrics`` as in ``metrics.jsonl``
        (the task metric, e.g. ``accuracy``, and ``loss``)."""

    def on_checkpoint(self, path: Path, global_step: int) -> None:
        """A complete checkpoint was written to ``path``."""

    def on_stage_end(self, stage: StageConfig, evaluation: Evaluation | None) -> None:
        """A stage finished; ``evaluation`` is its end-of-stage evaluation (None without eval data)."""


class CallbackError(GkdError):
    """A callback raised; the message names the callback and the event, the cause is chained."""


class Callbacks:
    """The callbacks of a run, called in order on global rank 0; one method per event."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = tuple(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise GkdError(f"callbacks: expected gkd.Callback instances, got {type(cb).__name__}")

    def _fire(self, event: str, *args: Any) -> None:
        from gkd import parallel  # here, so that defining a Callback subclass does not import torch

        # Asked at each call: the process group may not exist yet when the callbacks are made.
        if not self.callbacks or not parallel.is_global_rank_zero():
            return
        for cb in self.callbacks:
            try:
                getattr(cb, event)(*args)
            except Exception as exc:
                reason = str(exc).splitlines()[0] if str(exc) else ""
                raise CallbackError(f"callback {type(cb).__name__}.{event} failed: {type(exc).__name__}"
                                    + (f": {reason}" if reason else "")) from exc

    def stage_start(self, stage: StageConfig) -> None:
        self._fire("on_stage_start", stage)

    def step_end(self, info: StepInfo) -> None:
        self._fire("on_step_end", info)

    def evaluate(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self._fire("on_evaluate", stage, step, metrics)

    def checkpoint(self, path: Path, global_step: int) -> None:
        self._fire("on_checkpoint", path, global_step)

    def stage_end(self, stage: StageConfig, evaluation: Evaluation | None) -> None:
        self._fire("on_stage_end", stage, evaluation)


__all__ = ["Callback", "CallbackError", "Callbacks", "StepInfo"]
