"""Evaluation of one model on one split: accuracy (classification) or perplexity (LMs).

Token-level tasks use one convention everywhere (training's hard loss too): the loss is the
mean over all labelled tokens of the split, not a mean of per-example means.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gkd.engine.data import TaskDataset, make_batches
from gkd.errors import GkdError
from gkd.models import GkdModel
from gkd.parallel.placement import Placement


@dataclass(frozen=True)
class Evaluation:
    metric: str
    """``accuracy`` or ``perplexity``."""
    value: float
    loss: float
    """Mean cross-entropy per example (classification) or per labelled token (LMs)."""
    examples: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Examples per second of inference."""
        return self.examples / max(self.seconds, 1e-9)


Predict = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Logits of one CPU batch (``input_ids``, ``attention_mask``, …): gkd's model, or an exported one."""


@torch.no_grad()
def metric_pass(predict: Predict, data: TaskDataset, batch_size: int, *, seed: int) -> Evaluation:
    """Accuracy or perplexity of ``predict`` over ``data`` in dataset order: the one definition of gkd's
    evaluation metrics, shared by training-time evaluation and ``gkd eval`` of exported models."""
    correct = total = 0
    loss_sum = tokens = 0.0
    classify = data.task == "sequence_classification"
    start = time.perf_counter()
    for batch in make_batches(data, batch_size, shuffle=False, seed=seed):
        logits = predict(batch).float()
        labels = batch["labels"].to(logits.device)
        total += len(labels)
        if classify:
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        else:
            loss_sum += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum",
                                                                ignore_index=-100))
            tokens += float((labels != -100).sum())
    seconds = time.perf_counter() - start
    if classify:
        return Evaluation("accuracy", correct / max(total, 1), loss_sum / max(total, 1), total, seconds)
    mean = loss_sum / max(tokens, 1.0)
    return Evaluation("perplexity", math.exp(min(mean, 50.0)), mean, total, seconds)


def evaluate(model: GkdModel, data: TaskDataset, batch_size: int, placement: Placement, *, seed: int) -> Evaluation:
    """Evaluate ``model`` on ``data`` in eval mode (its train/eval mode is restored after)."""

    def predict(cpu_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = placement.batch(cpu_batch)
        out = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        if out.logits is None:
            raise GkdError("the model has no task head to evaluate")
        return out.logits

    was_training = model.training
    model.eval()
    try:
        return metric_pass(predict, data, batch_size, seed=seed)
    finally:
        model.train(was_training)


__all__ = ["Evaluation", "Predict", "evaluate", "metric_pass"]
