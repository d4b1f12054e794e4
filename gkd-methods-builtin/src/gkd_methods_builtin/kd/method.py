"""KD (Hinton et al., 2015): match the teacher's softened output distribution, plus the gold loss."""

from __future__ import annotations

from typing import Any

import torch

from gkd.errors import GkdError
from gkd.methods import losses
from gkd.methods.api import STUDENT, ForwardRequest, Method, PassPlan, PassView, StepContext, teacher_key


def soft_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """The prediction-layer soft loss shared by KD-style methods (``kl`` | ``ce`` | ``mse``)."""
    if kind == "kl":
        return losses.kl_divergence(student_logits, teacher_logits, temperature, mask)
    if kind == "ce":
        return losses.soft_cross_entropy(student_logits, teacher_logits, temperature, mask)
    return losses.mse(student_logits, teacher_logits, mask)


def teacher_logits(outputs: PassView, teacher: str, method: str) -> torch.Tensor:
    """A teacher's logits, or a clear error when the teacher has no task head."""
    logits = outputs.teacher(teacher).logits
    if logits is None:
        raise GkdError(f"{method}: teacher '{teacher}' has no task head, so it gives no logits; fine-tune it first "
                       f"(a stage with 'train: teacher:{teacher}') or use a feature-based method")
    return logits


def logits_mask(outputs: PassView) -> torch.Tensor | None:
    """Token logits ``[b, s, V]`` are averaged over real tokens; classification logits need no mask."""
    return outputs.batch["attention_mask"] if outputs.student.logits.dim() == 3 else None


class KD(Method):
    name = "kd"

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        teacher = teacher_key(self.context.teacher_names[0])
        return PassPlan({STUDENT: ForwardRequest(), teacher: ForwardRequest()})

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if cfg["soft_weight"] > 0:
            t_logits = teacher_logits(outputs, self.context.teacher_names[0], self.name)
            terms["soft"] = cfg["soft_weight"] * soft_loss(cfg["soft_loss"], outputs.student.logits, t_logits,
                                                           cfg["temperature"], logits_mask(outputs))
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms
