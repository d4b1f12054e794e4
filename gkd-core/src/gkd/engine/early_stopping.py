"""``training.early_stopping``: end a stage when its periodic evaluations stop improving.

The watch sees every periodic evaluation of a stage (``training.eval_every_steps``). An evaluation
improves when its metric beats the best so far by more than ``min_delta`` (higher accuracy; lower
perplexity or loss); after ``patience`` evaluations in a row without one, the stage ends at that
step: it is checkpointed as finished (``extra.early_stopping.stopped``), evaluated as at a normal
end, and the run goes on with the next stage. The student keeps its current weights. The watch's
state travels in every checkpoint of the stage, so a resumed run stops at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gkd.config.run import EarlyStopping
from gkd.engine.evaluate import Evaluation
from gkd.engine.resume import ResumePoint

LOWER_IS_BETTER = {"perplexity", "loss"}


@dataclass
class EarlyStopWatch:
    """The early-stopping state of one stage (JSON in checkpoints)."""

    config: EarlyStopping
    best: float | None = None
    since_best: int = 0
    stopped: bool = False
    metric: str | None = None

    @classmethod
    def for_stage(cls, config: EarlyStopping | None, resume: ResumePoint | None) -> EarlyStopWatch | None:
        """The stage's watch, continued from ``resume``'s checkpoint when it has one; None when off."""
        if config is None:
            return None
        saved = resume.state.extra.get("early_stopping") if resume is not None else None
        if not isinstance(saved, dict):
            return cls(config)
        return cls(config, saved.get("best"), int(saved.get("since_best", 0)), bool(saved.get("stopped", False)),
                   saved.get("metric"))

    def update(self, evaluation: Evaluation) -> bool:
        """Take one periodic evaluation; True when the stage should end now."""
        self.metric = evaluation.metric if self.config.metric == "auto" else self.config.metric
        value = evaluation.loss if self.metric == "loss" else evaluation.value
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.metric in LOWER_IS_BETTER:
            improved = value < self.best - self.config.min_delta
        else:
            improved = value > self.best + self.config.min_delta
        if improved:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        self.stopped = self.since_best >= self.config.patience
        return self.stopped

    def describe(self) -> str:
        return (f"{self.metric} has not improved on {self.best:.4f} for {self.since_best} evaluation(s) "
                f"(patience {self.config.patience})")

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "since_best": self.since_best, "stopped": self.stopped, "metric": self.metric}


def stopped_early(resume: ResumePoint) -> bool:
    """Whether ``resume``'s checkpoint is the end of a stage that early stopping ended."""
    saved = resume.state.extra.get("early_stopping")
    return isinstance(saved, dict) and saved.get("stopped") is True


__all__ = ["EarlyStopWatch", "stopped_early"]
