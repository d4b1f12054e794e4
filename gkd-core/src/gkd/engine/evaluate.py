"""Evaluation of one model on one split: accuracy (classification) or perplexity (LMs).

Token-level tasks use one convention everywhere (training's hard loss too): the loss is the
mean over all labelled tokens of the split, not a mean of per-example means.
"""

from __future__ import annotations

import math
import time
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


@torch.no_grad()
def evaluate(model: GkdModel, data: TaskDataset, batch_size: int, placement: Placement, *, seed: int) -> Evaluation:
    """Evaluate ``model`` on ``data`` in eval mode (its train/eval mode is restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    classify = data.task == "sequence_classification"
    start = time.perf_counter()
    for cpu_batch in make_batches(data, batch_size, shuffle=False, seed=seed):
        batch = placement.batch(cpu_batch)
        out = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        if out.logits is None:
            raise GkdError("the model has no task head to evaluate")
        logits = out.logits.float()
        labels = batch["labels"]
        total += len(labels)
        if classify:
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        else:
            loss_sum += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum",
                                                                ignore_index=-100))
            tokens += float((labels != -100).sum())
    seconds = time.perf_counter() - start
    model.train(was_training)
    if classify:
        return Evaluation("accuracy", correct / max(total, 1), loss_sum / max(total, 1), total, seconds)
    mean = loss_sum / max(tokens, 1.0)
    return Evaluation("perplexity", math.exp(min(mean, 50.0)), mean, total, seconds)


__all__ = ["Evaluation", "evaluate"]
