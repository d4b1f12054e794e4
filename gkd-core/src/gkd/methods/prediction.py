"""KD's prediction-layer terms, for every method that adds them next to its own loss.

A method whose config has KD's fields — ``soft_weight``, ``soft_loss``, ``temperature`` and
``hard_weight`` — gets the same ``soft`` and ``hard`` terms, the same validation rules and the
same claim on the gold-label loss from these three functions (KD itself, ALP-KD, CKD,
Universal-KD, RAIL-KD, MGSKD).

Under tensor parallelism with vocabulary heads, a method may read the local vocabulary shards
instead of the gathered logits (:func:`vocab_parallel_prediction` says when; the method then
requests ``logits.vocab_shard`` from the student and the teacher): :func:`prediction_terms`
notices the shards in its view and computes the same terms from them
(:func:`gkd.methods.losses.vocab_parallel_soft_loss`), so no rank holds ``[b, s, V]`` logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gkd.methods import losses
from gkd.methods.api import MethodContext, PassView, teacher_logits
from gkd.methods.checks import FeatureIssue, logits_issues
from gkd.models.taps import VOCAB_SHARD

VOCAB_HEADS = ("lm", "mlm")


def vocab_parallel_prediction(context: MethodContext, teachers: Iterable[str] | None = None) -> bool:
    """Whether the prediction terms should read vocabulary shards (``logits.vocab_shard``):
    under TP > 1 when the student and every teacher read (default: all) have an LM or MLM head.
    Classification heads are small and replicated; they keep the gathered logits."""
    names = list(context.teachers) if teachers is None else list(teachers)
    heads = [context.student.head, *(context.teachers[n].head for n in names)]
    return context.tensor_parallel > 1 and all(h in VOCAB_HEADS for h in heads)


def prediction_terms(method: str, config: Mapping[str, Any], outputs: PassView, teacher: str, *,
                     vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """``soft`` (``soft_weight``·soft loss of the student's against ``teacher``'s logits at
    ``temperature``, padding excluded) and ``hard`` (``hard_weight``·the student's task loss);
    a term whose weight is 0 (or a hard term without labels) is left out.

    When the student's view holds ``logits.vocab_shard`` (the method requested it from the
    student and the teacher), the soft term is computed from the shards; ``vocab_size`` (the
    student's ``ModelShape.vocab_size``) is then required."""
    terms: dict[str, torch.Tensor] = {}
    student = outputs.student
    if config["soft_weight"] > 0 and VOCAB_SHARD in student.features:
        if vocab_size is None:
            raise ValueError(f"{method}: prediction_terms needs vocab_size to read logits.vocab_shard")
        shard = student.features[VOCAB_SHARD]
        terms["soft"] = config["soft_weight"] * losses.vocab_parallel_soft_loss(
            config["soft_loss"], shard, outputs.teacher(teacher).features[VOCAB_SHARD], vocab_size,
            config["temperature"], outputs.batch.get("attention_mask"))
    elif config["soft_weight"] > 0:
        t_logits = teacher_logits(outputs, teacher, method)
        mask = losses.logits_mask(student.logits, outputs.batch.get("attention_mask"))
        terms["soft"] = config["soft_weight"] * losses.soft_loss(config["soft_loss"], student.logits, t_logits,
                                                                 config["temperature"], mask)
    if config["hard_weight"] > 0 and student.task_loss is not None:
        terms["hard"] = config["hard_weight"] * student.task_loss
    return terms


def prediction_issues(method: str, config: Mapping[str, Any], context: MethodContext,
                      fix: str = "or set soft_weight: 0") -> list[FeatureIssue]:
    """The logits rules of the soft term (every teacher read has a head as wide as the
    student's), only when ``soft_weight > 0``."""
    if config["soft_weight"] <= 0:
        return []
    return logits_issues(method, context, field="soft_weight", fix=fix)


def hard_loss_claim(config: Mapping[str, Any]) -> dict[str, str]:
    """:meth:`Method.exclusive` of a method whose ``hard_weight`` adds the gold-label term."""
    return {"hard_loss": "hard_weight"} if config["hard_weight"] > 0 else {}


__all__ = ["VOCAB_HEADS", "hard_loss_claim", "prediction_issues", "prediction_terms", "vocab_parallel_prediction"]
