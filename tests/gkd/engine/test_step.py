"""The distillation step and hook-plan merging, on a small tap-capable model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from gkd.engine.plan import merge_plans
from gkd.engine.step import SelectedMethod, distill_step, method_generator, step_context
from gkd.methods.api import STUDENT, ForwardRequest, Method, MethodContext, PassPlan, teacher_key
from gkd.testing import shape


@dataclass
class Out:
    logits: torch.Tensor


class TapModel(nn.Module):
    """Two linear 'layers' with taps ``embeddings``, ``layers.{i}.output`` and ``logits``;
    counts how often each feature is materialised."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 3)
        self._features: set[str] = set()
        self._ops: dict[str, Any] = {}
        self._store: dict[str, torch.Tensor] | None = None
        self.materialised: list[str] = []

    @contextlib.contextmanager
    def capture(self, features=(), operations=None):
        self._features, self._ops, self._store = set(features), dict(operations or {}), {}
        try:
            yield self._store
        finally:
            self._features, self._ops, self._store = set(), {}, None

    def _tap(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name in self._ops:
            value = self._ops[name](value)
        if name in self._features:
            self.materialised.append(name)
            self._store[name] = value
        return value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self._tap("embeddings", self.emb(input_ids))
        for i, layer in enumerate(self.layers):
            h = self._tap(f"layers.{i}.output", torch.tanh(layer(h)))
        return Out(self._tap("logits", self.head(h[:, 0])))


class Recorder(Method):
    """Asks for fixed features; records what it received; loss = mean of the student features."""

    name = "rec"

    def __init__(self, config, context):
        super().__init__(config, context)
        self.received: list[dict[str, set[str]]] = []

    def plan(self, step, state, pass_index, previous):
        if pass_index >= self.config["passes"]:
            return None
        ops = {"embeddings": self.config["op"]} if pass_index == 1 and "op" in self.config else {}
        return PassPlan({STUDENT: ForwardRequest(frozenset(self.config["student"]), ops),
                         teacher_key("t"): ForwardRequest(frozenset(self.config["teacher"]))})

    def loss(self, step, state, pass_index, outputs):
        self.received.append({k: set(v.features) for k, v in outputs.models.items()})
        state["calls"] = state.get("calls", 0) + 1
        return {"feat": sum(f.mean() for f in outputs.student.features.values())}


def ctx() -> MethodContext:
    return MethodContext(shape(), {"t": shape()}, "sequence_classification", "task")


def batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
            "labels": torch.tensor([0, 2])}


def contexts(names):
    return {n: step_context(0, "s", 0, 0, 0, 10, n) for n in names}


def test_merge_unions_features_and_composes_operations():
    a = PassPlan({STUDENT: ForwardRequest(frozenset({"x", "y"}), {"embeddings": lambda v: v + 1})})
    b = PassPlan({STUDENT: ForwardRequest(frozenset({"y", "z"}), {"embeddings": lambda v: v * 10}),
                  "teacher:t": ForwardRequest(frozenset({"y"}))})
    merged = merge_plans({"a": a, "b": b})
    assert list(merged.requests) == ["student", "teacher:t"]
    assert merged.requests["student"].features == {"x", "y", "z"}
    assert merged.requests["student"].composed_operations()["embeddings"](1) == 20  # a then b
    assert merge_plans({}, include_student=True).requests.keys() == {"student"}


def test_shared_feature_extracted_once_and_views_are_isolated():
    models = {STUDENT: TapModel(0), "teacher:t": TapModel(1)}
    m1 = Recorder({"passes": 1, "student": ["layers.0.output"], "teacher": ["layers.1.output"]}, ctx())
    m2 = Recorder({"passes": 1, "student": ["layers.0.output", "embeddings"], "teacher": []}, ctx())
    methods = {"m1": SelectedMethod(m1, 1.0), "m2": SelectedMethod(m2, 0.5)}
    result = distill_step(models, methods, contexts(methods), batch())
    assert sorted(models[STUDENT].materialised) == ["embeddings", "layers.0.output"]  # once each
    assert models["teacher:t"].materialised == ["layers.1.output"]
    assert m1.received == [{"student": {"layers.0.output"}, "teacher:t": {"layers.1.output"}}]
    assert m2.received == [{"student": {"layers.0.output", "embeddings"}, "teacher:t": set()}]
    assert set(result.terms) == {"m1.feat", "m2.feat"}
    assert torch.allclose(result.loss, result.terms["m1.feat"] + result.terms["m2.feat"])
    assert methods["m1"].state == {"calls": 1}


def test_teachers_run_without_grad_and_student_with():
    models = {STUDENT: TapModel(0), "teacher:t": TapModel(1)}
    m = Recorder({"passes": 1, "student": ["layers.1.output"], "teacher": ["layers.1.output"]}, ctx())
    seen = {}

    def loss(step, state, pass_index, outputs):
        seen["s"] = outputs.student.features["layers.1.output"].requires_grad
        seen["t"] = outputs.teacher("t").features["layers.1.output"].requires_grad
        return {"x": outputs.student.features["layers.1.output"].pow(2).mean()}

    m.loss = loss
    result = distill_step(models, {"m": SelectedMethod(m, 1.0)}, contexts(["m"]), batch())
    result.loss.backward()
    assert seen == {"s": True, "t": False}
    assert models[STUDENT].layers[1].weight.grad is not None
    assert models["teacher:t"].layers[1].weight.grad is None


def test_second_pass_with_operation_and_non_contributing_pass():
    models = {STUDENT: TapModel(0), "teacher:t": TapModel(1)}
    m = Recorder({"passes": 2, "student": ["embeddings"], "teacher": [], "op": lambda v: v * 0}, ctx())
    orig_plan = m.plan
    m.plan = lambda s, st, p, prev: (lambda pl: PassPlan(pl.models, contributes_to_loss=p == 1) if pl else None)(
        orig_plan(s, st, p, prev))
    result = distill_step(models, {"m": SelectedMethod(m, 2.0)}, contexts(["m"]), batch())
    assert set(result.terms) == {"m.feat", "m.pass1.feat"}
    assert result.terms["m.pass1.feat"].item() == 0.0  # the operation zeroed the embeddings
    assert torch.equal(result.loss, result.terms["m.pass1.feat"])  # pass 0 logged, not optimised


def test_plain_training_is_the_task_loss():
    model = TapModel(0)
    result = distill_step({STUDENT: model}, {}, {}, batch())
    logits = model(batch()["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch()["labels"])
    assert result.terms.keys() == {"task"} and torch.allclose(result.loss, expected)


def test_method_generator_is_deterministic_per_step():
    a = torch.rand(3, generator=method_generator(1, "s", 5, "m"))
    assert torch.equal(a, torch.rand(3, generator=method_generator(1, "s", 5, "m")))
    assert not torch.equal(a, torch.rand(3, generator=method_generator(1, "s", 6, "m")))


def test_missing_model_is_reported():
    m = Recorder({"passes": 1, "student": [], "teacher": []}, ctx())
    with pytest.raises(KeyError, match="teacher:t"):
        distill_step({STUDENT: TapModel(0)}, {"m": SelectedMethod(m, 1.0)}, contexts(["m"]), batch())


def test_parts_of_a_term_are_logged_weighted_and_detached_but_never_added():
    models = {STUDENT: TapModel(0), "teacher:t": TapModel(1)}
    m = Recorder({"passes": 1, "student": ["layers.0.output", "layers.1.output"], "teacher": []}, ctx())

    def loss(step, state, pass_index, outputs):
        a, b = (outputs.student.features[f"layers.{i}.output"].pow(2).mean() for i in (0, 1))
        return {"feat": a + b, "feat/0": a, "feat/1": b}

    m.loss = loss
    result = distill_step(models, {"m": SelectedMethod(m, 0.5)}, contexts(["m"]), batch())
    assert set(result.terms) == {"m.feat", "m.feat/0", "m.feat/1"}
    assert torch.equal(result.loss, result.terms["m.feat"])  # the parts are not added again
    assert not result.terms["m.feat/0"].requires_grad and result.terms["m.feat"].requires_grad
    assert torch.allclose(result.terms["m.feat/0"] + result.terms["m.feat/1"], result.terms["m.feat"].detach())
