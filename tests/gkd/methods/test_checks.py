"""Static checks of FeatureUse patterns and of Method.check, before any model exists."""

from __future__ import annotations

from typing import Any

import pytest

from gkd.methods import (
    FeatureIssue,
    FeatureUse,
    Method,
    MethodContext,
    MethodSpec,
    check_features,
    logits_issues,
    validate_feature_patterns,
)
from gkd.methods.checks import matches, parse_pattern
from gkd.testing import shape


def _spec(student=(), teacher=(), factory=None) -> MethodSpec:
    return MethodSpec(name="probe", summary="", citation="", kind="single-teacher", stages=("task",),
                      features=FeatureUse(teacher=tuple(teacher), student=tuple(student)), factory=factory)


def _ctx(student=None, **teachers) -> MethodContext:
    return MethodContext(student or shape(num_layers=2), teachers or {"t": shape()}, "sequence_classification", "task")


def test_pattern_grammar():
    assert parse_pattern("embeddings") == (None, "embeddings")
    assert parse_pattern("layers.{i}.attention.scores") == ("{i}", "attention.scores")
    assert parse_pattern("layers.11.ffn.intermediate") == (11, "ffn.intermediate")
    assert parse_pattern("layers.01.output") is None and parse_pattern("layers.{j}.output") is None
    assert validate_feature_patterns(FeatureUse(teacher=("logits", "pooled", "final_norm", "layers.{i}.input"),
                                                student=("layers.0.attention.probs",))) == []
    problems = validate_feature_patterns(FeatureUse(teacher=("layers.{i}.atention.scores", "hiden"),
                                                    student=("layers.x.output",)))
    assert problems == [
        "teacher feature 'layers.{i}.atention.scores': unknown layer role 'atention.scores'; "
        "did you mean 'layers.{i}.attention.scores'?",
        "teacher feature 'hiden' is not a tap pattern (use embeddings, logits, logits.vocab_shard, pooled, final_norm or "
        "layers.{i}.<role> with <role> in input, output, attention.query, attention.key, attention.value, "
        "attention.scores, attention.probs, attention.context, ffn.intermediate)",
        "student feature 'layers.x.output': the layer must be {i} or a layer number, not 'x'",
    ]
    assert validate_feature_patterns(FeatureUse(teacher="logits")) == [  # type: ignore[arg-type]
        "teacher features must be a tuple of tap patterns, got str"]


def test_matches():
    assert matches("layers.{i}.output", "layers.3.output")
    assert not matches("layers.{i}.output", "layers.3.input")
    assert matches("layers.3.output", "layers.3.output") and not matches("layers.2.output", "layers.3.output")
    assert matches("logits", "logits") and not matches("layers.{i}.output", "embeddings")


def test_family_taps_and_literal_layers_are_checked_per_model():
    spec = _spec(student=("final_norm", "layers.1.output"), teacher=("pooled", "layers.5.output"))
    issues = check_features(spec, {}, _ctx(shape(num_layers=2), t=shape("decoder", 6),
                                           m=shape(num_layers=4, has_pooler=False)))
    assert [(i.model, i.field) for i in issues] == [("student", None), ("teacher 't'", None), ("teacher 'm'", None),
                                                    ("teacher 'm'", None)]
    assert [i.message for i in issues[:3]] == [
        "probe reads 'final_norm', which only decoders have, but the student is an encoder",
        "probe reads 'pooled', which only encoders with a pooler have, but the teacher 't' is a decoder",
        "probe reads 'pooled', but the teacher 'm' is an encoder without a pooler (add_pooler: false)",
    ]
    assert issues[3].message == "probe reads 'layers.5.output', but the teacher 'm' has 4 layers (layers.0 to layers.3)"
    assert check_features(spec, {}, _ctx(shape("decoder", 2), t=shape(num_layers=6))) == []


def test_unknown_pooler_and_head_pass():
    spec = _spec(teacher=("pooled", "logits"))
    unknown = shape().__class__("encoder", 4, 32, 4, 4, 128, 100, 3)  # as validation builds it from config.json
    assert unknown.has_pooler is None and unknown.has_logits is None
    assert check_features(spec, {}, _ctx(t=unknown)) == []


class _Checked(Method):
    name = "probe"

    @classmethod
    def check(cls, config: dict[str, Any], context: MethodContext) -> list[FeatureIssue]:
        return [FeatureIssue("student", "width", f"probe: width {config['width']}")]


def test_method_check_gets_the_defaulted_config():
    spec = MethodSpec(name="probe", summary="", citation="", kind="single-teacher", stages=("task",),
                      config_schema={"type": "object", "properties": {"width": {"type": "integer", "default": 7}}},
                      factory=_Checked)
    assert check_features(spec, {}, _ctx()) == [FeatureIssue("student", "width", "probe: width 7")]
    assert Method.check({}, _ctx()) == []  # the default: no issue


def test_logits_issues():
    ctx = MethodContext(shape("decoder", 2, head="none"), {"a": shape("decoder", vocab_size=90), "b": shape("decoder")},
                        "causal_lm", "task")
    issues = logits_issues("probe", ctx, field="soft_weight", fix="or set soft_weight: 0")
    assert [(i.model, i.field) for i in issues] == [("student", "soft_weight"), ("teacher 'a'", "soft_weight")]
    assert issues[0].message == ("probe: the student has no task head, so it gives no logits; give it the task's head "
                                 "or set soft_weight: 0")
    ctx = MethodContext(shape("decoder", 2), ctx.teachers, "causal_lm", "task")
    (issue,) = logits_issues("probe", ctx)
    assert issue.message == "probe: compares logits of equal width, but the student has 100 vocabulary entries and teacher 'a' 90"


@pytest.mark.parametrize("name", ["kd", "tinybert", "tmkd"])
def test_builtin_specs_use_valid_patterns(name):
    from gkd.plugins import load_plugin_manager

    assert validate_feature_patterns(load_plugin_manager().registry.get(name).spec.features) == []
