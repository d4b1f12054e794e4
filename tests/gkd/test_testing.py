"""The test kit for method authors (gkd.testing): tiny models, batches, steps and conformance."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkd.methods import (
    STUDENT,
    FeatureUse,
    ForwardRequest,
    GkdError,
    Method,
    MethodSpec,
    ModelView,
    PassPlan,
    losses,
    teacher_key,
)
from gkd.testing import (
    TINY_HEADS,
    build_method,
    check_conformance,
    check_tensor_parallel,
    context_of,
    outputs,
    run_step,
    selected,
    shape,
    step,
    tiny_batch,
    tiny_models,
)

# ----------------------------------------------------------------------------- a small method family


class HiddenMSE(Method):
    """Student's last hidden state → teacher's, through a projection; a step counter in its state."""

    name = "probe"

    def __init__(self, config: dict[str, Any], context: Any) -> None:
        super().__init__(config, context)
        s, t = context.student, next(iter(context.teachers.values()))
        self.proj = nn.Linear(s.hidden_size, t.hidden_size, bias=False)
        self.s_tap, self.t_tap = f"layers.{s.num_layers - 1}.output", f"layers.{t.num_layers - 1}.output"

    def initial_state(self) -> dict[str, Any]:
        return {"steps": 0}

    def plan(self, step, state, pass_index, previous):
        if pass_index > 0:
            return None
        return PassPlan({STUDENT: ForwardRequest(frozenset({self.s_tap})),
                         teacher_key(self.context.teacher_names[0]): ForwardRequest(frozenset({self.t_tap}))})

    def loss(self, step, state, pass_index, outputs):
        s = self.proj(outputs.student.features[self.s_tap])
        t = outputs.teacher(self.context.teacher_names[0]).features[self.t_tap]
        return {"hidden": losses.mse(s, t, outputs.batch["attention_mask"])}

    def after_step(self, step, state, terms):
        state["steps"] += 1


def _spec(factory=HiddenMSE, *, has_parameters=True, features=("layers.{i}.output",), schema=None) -> MethodSpec:
    return MethodSpec(name="probe", summary="", citation="", kind="single-teacher", stages=("task",),
                      features=FeatureUse(teacher=features, student=features), has_parameters=has_parameters,
                      config_schema=schema or {"type": "object", "additionalProperties": False, "properties": {}},
                      factory=factory)


# ----------------------------------------------------------------------------- models and batches


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_tiny_models_match_their_shapes_and_run_like_the_trainer(family):
    models = tiny_models(family, teachers={"deep": 4, "shallow": 3})
    assert list(models) == ["student", "teacher:deep", "teacher:shallow"]
    ctx = context_of(models)
    assert (ctx.student.num_layers, ctx.teachers["deep"].num_layers, ctx.teachers["shallow"].num_layers) == (2, 4, 3)
    assert {s.num_attention_heads for s in [ctx.student, *ctx.teachers.values()]} == {TINY_HEADS}
    assert ctx.task == ("causal_lm" if family == "decoder" else "sequence_classification")
    assert ctx.student.head == ("lm" if family == "decoder" else "classification")
    assert ctx.student.has_pooler is (family == "encoder")
    assert models["student"].training and not models["teacher:deep"].training
    assert not any(p.requires_grad for p in models["teacher:deep"].parameters())
    again = tiny_models(family, teachers={"deep": 4, "shallow": 3})
    assert all(torch.equal(a, b) for a, b in zip(models["student"].parameters(), again["student"].parameters(), strict=True))


def test_tiny_batches_have_padding_and_engine_labels():
    cls = tiny_batch("encoder")
    assert cls["attention_mask"][-1].tolist() == [1] * 6 + [0] * 2 and cls["labels"].shape == (2,)
    assert (cls["input_ids"][cls["attention_mask"] == 0] == 0).all() and "token_type_ids" in cls
    lm = tiny_batch("decoder")
    assert "token_type_ids" not in lm
    ids, lab, mask = lm["input_ids"], lm["labels"], lm["attention_mask"]
    assert torch.equal(lab[0, :-1], ids[0, 1:]) and lab[0, -1] == -100  # already shifted
    assert lab[1].tolist()[5:] == [-100, -100, -100] and lab[1, 4] == ids[1, 5]
    mlm = tiny_batch("encoder", "masked_lm", generator=torch.Generator().manual_seed(3))
    chosen = mlm["labels"] != -100
    assert chosen[:, 0].all() and (mlm["input_ids"][chosen] == 4).all() and (mask.bool() | ~chosen).all()


def test_outputs_computes_the_task_loss_from_labels():
    z = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    view = outputs({"labels": labels}, ModelView({}, z), {"t": ModelView({}, None)})
    assert view.student.task_loss.item() == pytest.approx(F.cross_entropy(z, labels).item())
    assert torch.allclose(view.student.task_loss_per_example, F.cross_entropy(z, labels, reduction="none"))
    assert view.teacher("t").task_loss is None  # no logits, no loss
    kept = outputs({"labels": labels}, ModelView({}, z, torch.tensor(0.5)))
    assert kept.student.task_loss.item() == 0.5


def test_build_method_validates_before_defaults_and_gives_state():
    with pytest.raises(GkdError, match=r"tinybert: config\.layer_mapping: 'uniformly' is not one of"):
        build_method("tinybert", {"layer_mapping": "uniformly"})
    with pytest.raises(GkdError, match=r"config\.atention: unknown key; did you mean 'attention'"):
        build_method("tinybert", {"atention": False})
    with pytest.raises(GkdError, match=r"^config\.attention: tinybert: the attention loss needs equal head counts"):
        build_method("tinybert", student=shape(num_attention_heads=2))
    method, state = build_method("tinybert", with_state=True)
    assert state == {"teacher_map": [0, 2, 4], "map_block": -1} and method.context.stage_kind == "task"
    a, b = build_method(_spec(), seed=3), build_method(_spec(), seed=3)
    assert torch.equal(a.proj.weight, b.proj.weight)
    models = tiny_models(teachers=("x", "y"))
    assert build_method("kd", models=models, teachers=["y"]).context.teacher_names == ["y"]


def test_build_method_names_the_method_and_field_of_each_config_error():
    with pytest.raises(GkdError, match=r"^kd: config\.soft_loss: 'kll' is not one of \['kl', 'ce', 'mse'\]$"):
        build_method("kd", {"soft_loss": "kll"})
    with pytest.raises(GkdError) as err:
        build_method("kd", {"soft_loss": "kll", "temprature": 2.0})
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("kd: config.") for line in lines)
    assert any("config.temprature: unknown key" in line for line in lines)


def test_build_method_passes_the_stage_kind_and_checks_it_against_the_spec():
    assert build_method("kd").context.stage_kind == "task"
    assert build_method("kd", stage_kind="pretrain").context.stage_kind == "pretrain"
    models = tiny_models()
    assert build_method("kd", models=models, stage_kind="pretrain").context.stage_kind == "pretrain"
    pretrain_only = dataclasses.replace(_spec(), stages=("pretrain",))
    assert build_method(pretrain_only).context.stage_kind == "pretrain"  # the default follows spec.stages
    with pytest.raises(GkdError, match=r"^probe: stage_kind: method 'probe' applies to task stages, not to a "
                                       r"'pretrain' stage$"):
        build_method(_spec(), stage_kind="pretrain")
    with pytest.raises(GkdError, match=r"^kd: stage_kind: 'finetune' is not one of \['pretrain', 'task'\]$"):
        build_method("kd", stage_kind="finetune")


def test_build_method_passes_the_tensor_parallel_size_and_checks_it_divides_the_models():
    assert build_method("kd").context.tensor_parallel == 1
    assert build_method("kd", tensor_parallel=2).context.tensor_parallel == 2
    models = tiny_models()
    assert build_method("tinybert", models=models, tensor_parallel=4).context.tensor_parallel == TINY_HEADS
    with pytest.raises(GkdError, match=r"^kd: tensor_parallel: 3 must divide the attention heads of the student "
                                       rf"\({TINY_HEADS}\)$"):
        build_method("kd", tensor_parallel=3)
    with pytest.raises(GkdError, match=r"^kd: tensor_parallel: 2 must divide the attention heads of teacher 't' "
                                       r"\(3\)$"):
        build_method("kd", tensor_parallel=2, teachers={"t": shape(num_attention_heads=3, hidden_size=48)})
    with pytest.raises(GkdError, match=r"^kd: tensor_parallel: expected a positive integer, got 0$"):
        build_method("kd", tensor_parallel=0)


def test_run_step_uses_the_engine_and_keeps_a_selected_state():
    models = tiny_models()
    batch = tiny_batch()
    sel = selected(build_method(_spec(), models=models))
    for i in range(2):
        result = run_step({"probe": sel}, models, batch, iteration=i, after_step=True)
    assert sel.state == {"steps": 2} and set(result.terms) == {"probe.hidden"}
    s_out, t_out = models["student"], models["teacher:t"]
    with s_out.capture({"layers.1.output"}) as fs, torch.no_grad():
        s_out(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with t_out.capture({"layers.3.output"}) as ft, torch.no_grad():
        t_out(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    expected = losses.mse(sel.method.proj(fs["layers.1.output"]), ft["layers.3.output"], batch["attention_mask"])
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    kd = run_step(build_method("kd", models=models), models, batch)
    assert kd.terms["kd.hard"].item() == pytest.approx(
        F.cross_entropy(models["student"](batch["input_ids"], batch["attention_mask"]).logits, batch["labels"]).item(),
        rel=1e-5)


# ----------------------------------------------------------------------------- conformance


def test_conformance_accepts_a_correct_method():
    report = check_conformance(_spec(), steps=2)
    assert report.states == [{"steps": 1}, {"steps": 2}]
    assert report.plans[0] == [{"student": {"layers.1.output"}, "teacher:t": {"layers.3.output"}}]


class GlobalState(HiddenMSE):
    calls = itertools.count()

    def plan(self, step, state, pass_index, previous):
        plan = super().plan(step, state, pass_index, previous)
        if plan is not None and next(GlobalState.calls) < 2:  # process state, not step.generator
            return PassPlan({**plan.models, STUDENT: ForwardRequest(frozenset({self.s_tap, "layers.0.output"}))})
        return plan


def test_conformance_catches_choices_that_do_not_come_from_the_generator():
    GlobalState.calls = itertools.count()  # the first run (2 steps) plans differently from the second
    with pytest.raises(AssertionError, match="probe: step 0 plans differ between two identical runs"):
        check_conformance(_spec(GlobalState), steps=2)


class Undeclared(HiddenMSE):
    def plan(self, step, state, pass_index, previous):
        plan = super().plan(step, state, pass_index, previous)
        return plan and PassPlan({**plan.models, STUDENT: ForwardRequest(frozenset({self.s_tap, "embeddings"}))})


class HoldsTeacher(HiddenMSE):
    def setup(self, models):
        self.teacher = models["teacher:t"]


class TupleState(HiddenMSE):
    def initial_state(self):
        return {"map": (0, 2, 4)}


class NanTerm(HiddenMSE):
    def loss(self, step, state, pass_index, outputs):
        return {"hidden": super().loss(step, state, pass_index, outputs)["hidden"] * float("nan")}


class Detached(HiddenMSE):
    def loss(self, step, state, pass_index, outputs):
        return {"hidden": super().loss(step, state, pass_index, outputs)["hidden"].detach()}


@pytest.mark.parametrize(("spec", "message"), [
    (_spec(Undeclared), "probe: pass 0 requests 'embeddings' from student, which no student pattern of spec.features "
                        "matches (layers.{i}.output)"),
    (_spec(HoldsTeacher), "probe: the method holds a model as a sub-module after setup() (['teacher'])"),
    (_spec(TupleState), "probe: the state from initial_state() changes in a JSON round trip"),
    (_spec(NanTerm), "probe: term 'probe.hidden' is not finite: nan"),
    (_spec(Detached), "probe: the loss has no autograd graph"),
    (_spec(has_parameters=False), "probe: spec.has_parameters=False, but the method owns 1 parameter tensor(s)"),
    (_spec(features=("layers.{i}.outputs",)), "probe: spec.features: teacher feature 'layers.{i}.outputs': unknown "
                                              "layer role"),
    (_spec(schema={"type": "object", "properties": {"w": {"type": "number", "minimum": 0, "default": -1}}}),
     "probe: the schema rejects its own defaults: config.w: -1 is less than the minimum of 0"),
])
def test_conformance_names_the_broken_rule(spec, message):
    with pytest.raises(AssertionError) as info:
        check_conformance(spec)
    assert str(info.value).startswith(message), str(info.value)


def test_unit_helpers_keep_their_defaults():
    s = shape()
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_kv_heads, s.num_labels, s.head) == (4, 32, 4, 4, 3,
                                                                                                 "classification")
    d = shape("decoder")
    assert d.num_labels is None and d.head == "lm" and d.has_pooler is False
    assert step(iteration=5, total=10).progress == 0.5


@pytest.mark.distributed
@pytest.mark.parametrize(("name", "config", "family"), [
    ("tinybert", {"prediction": True}, "encoder"),  # head-sharded attention scores + an owned projection
    ("minilm", {}, "encoder"),                        # self-attention relations of sharded Q/K/V
    ("kd", {"temperature": 2.0}, "decoder"),          # vocabulary-sharded logits of a tied LM head
])
def test_check_tensor_parallel_passes_for_builtin_methods(name, config, family):
    report = check_tensor_parallel(name, config, family=family, steps=2)
    assert len(report.loss) == 2 and all(math.isfinite(v) for v in report.loss)
    assert report.terms[0] and set(report.terms[0]) == set(report.terms[1])
    assert any(k.startswith("grad ") for k in report.max_diff) and max(report.max_diff.values()) <= 1e-5
    if name == "tinybert":
        assert any(k.startswith("grad method.") for k in report.max_diff)  # the method's own parameters compared


class _LocalScores(Method):
    """Attention-score MSE averaged over this rank's heads only: right at TP=1, wrong under TP
    (a real method reduces over the TP group, e.g. ``losses.all_reduce_mean_over_tp``)."""

    name = "local-scores"

    def plan(self, step, state, pass_index, previous):
        if pass_index:
            return None
        scores = frozenset({"layers.0.attention.scores"})
        return PassPlan({STUDENT: ForwardRequest(features=scores), teacher_key("t"): ForwardRequest(features=scores)})

    def loss(self, step, state, pass_index, outputs):
        s = outputs.student.features["layers.0.attention.scores"]
        t = outputs.teacher("t").features["layers.0.attention.scores"]
        valid = losses.attention_valid_mask(outputs.batch["attention_mask"]).expand_as(s)
        return {"scores": ((s - t)[valid] ** 2).mean()}


LOCAL_SCORES = MethodSpec(name="local-scores", summary="test", citation="test", kind="single-teacher",
                          stages=("task",), features=FeatureUse(teacher=("layers.{i}.attention.scores",),
                                                                student=("layers.{i}.attention.scores",)),
                          factory=_LocalScores)


@pytest.mark.distributed
def test_check_tensor_parallel_catches_a_method_that_ignores_sharding():
    with pytest.raises(AssertionError, match=r"local-scores: step 0, (loss|scores) differs at TP=2 \(rank \d\) from "
                                             r"TP=1 by [\d.e+-]+ > 1e-05"):
        check_tensor_parallel(LOCAL_SCORES, steps=1)
