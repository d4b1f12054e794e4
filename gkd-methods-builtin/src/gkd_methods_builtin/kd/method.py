"""KD (Hinton et al., 2015): match the teacher's softened output distribution, plus the gold loss.

Under tensor parallelism with LM / MLM heads, KD reads the local vocabulary shards
(``logits.vocab_shard``) and computes its terms with a distributed softmax, so no rank gathers
the ``[b, s, V]`` logits of the student or the teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gkd.methods import (
    STUDENT,
    VOCAB_SHARD,
    FeatureIssue,
    ForwardRequest,
    Method,
    MethodContext,
    PassPlan,
    PassView,
    StepContext,
    hard_loss_claim,
    prediction_issues,
    prediction_terms,
    teacher_key,
    vocab_parallel_prediction,
)


class KD(Method):
    name = "kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        return prediction_issues(cls.name, config, context, fix="or set soft_weight: 0 (hard loss only)")

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        features = frozenset({VOCAB_SHARD}) if vocab_parallel_prediction(self.context, [self.teacher_name]) else frozenset()
        return PassPlan({STUDENT: ForwardRequest(features), teacher_key(self.teacher_name): ForwardRequest(features)})

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        return prediction_terms(self.name, self.config, outputs, self.teacher_name,
                                vocab_size=self.context.student.vocab_size)
