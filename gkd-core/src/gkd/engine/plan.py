"""Merging the per-pass plans of several methods into one request per model.

A feature two methods ask for is extracted once and both receive the same tensor; each
method's view contains only the names it requested. Operations at the same point of the
same model are composed in method order (the order of the stage's ``methods`` list).

Full-vocabulary logits are the default: every method sees ``ModelView.logits``. A method whose
request for a model names ``logits.vocab_shard`` declares that it reads only that shard; when
every method planning the model in a pass does so, the model skips the all-gather and its view
has ``logits=None`` (the task loss then comes from the shards too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gkd.methods.api import STUDENT, PassPlan
from gkd.models.operations import compose
from gkd.models.taps import VOCAB_SHARD, Operation


@dataclass
class ModelRequest:
    """The merged request for one model in one pass."""

    features: set[str] = field(default_factory=set)
    operations: dict[str, list[tuple[str, Operation]]] = field(default_factory=dict)
    """point → [(method name, operation), …] in method order."""
    grad: bool = False
    full_logits: bool = False
    """Some method planning this model reads its gathered ``logits`` (its request lacks ``logits.vocab_shard``)."""
    candidates: set[str] = field(default_factory=set)
    """Features some method may request in other iterations (what a teacher cache records too)."""

    def capture_features(self) -> set[str]:
        """What the model records: the requested features, plus ``logits`` when the shard is
        requested but some method still reads the full logits (so the gather runs)."""
        if self.full_logits and VOCAB_SHARD in self.features:
            return self.features | {"logits"}
        return set(self.features)

    def composed_operations(self) -> dict[str, Operation]:
        """One callable per point: each method's operation applied to the previous one's result."""
        return {point: compose(*(fn for _, fn in ops)) for point, ops in self.operations.items()}


@dataclass
class MergedPass:
    requests: dict[str, ModelRequest]
    """Model key → merged request; the order is student first, then teachers in first-use order."""
    plans: dict[str, PassPlan]
    """Method name → its own plan (to slice its features out of the merged results)."""


def merge_plans(plans: Mapping[str, PassPlan], *, include_student: bool = True) -> MergedPass:
    """Merge method plans of one pass; ``include_student`` forces a student forward (pass 0)."""
    requests: dict[str, ModelRequest] = {STUDENT: ModelRequest()} if include_student else {}
    for method, plan in plans.items():
        for model, req in plan.models.items():
            merged = requests.setdefault(model, ModelRequest())
            merged.features |= set(req.features)
            merged.grad = merged.grad or req.grad
            merged.candidates |= set(req.candidates)
            merged.full_logits = merged.full_logits or VOCAB_SHARD not in req.features
            for point, op in req.operations.items():
                merged.operations.setdefault(point, []).append((method, op))
    if STUDENT in requests:  # student first: teachers may need nothing from it, but ordering is stable
        requests = {STUDENT: requests[STUDENT], **{k: v for k, v in requests.items() if k != STUDENT}}
    return MergedPass(requests, dict(plans))
