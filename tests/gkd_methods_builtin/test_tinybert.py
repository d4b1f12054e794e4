from __future__ import annotations

import pytest
import torch

from gkd.methods import GkdError, MethodContext, ModelView, check_features
from gkd.testing import build_method, check_conformance, outputs, shape, step
from gkd_methods_builtin.tinybert import SPEC

S, T, HS, HT, HEADS, B, L = 2, 4, 16, 32, 4, 3, 5


def _features(layers: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    feats = {"embeddings": torch.randn(B, L, hidden, generator=gen)}
    for i in range(layers):
        feats[f"layers.{i}.output"] = torch.randn(B, L, hidden, generator=gen)
        feats[f"layers.{i}.attention.scores"] = torch.randn(B, HEADS, L, L, generator=gen)
    return feats


def _method(**config):
    return build_method("tinybert", config, student=shape(num_layers=S, hidden_size=HS, num_attention_heads=HEADS),
                        teachers={"t": shape(num_layers=T, hidden_size=HT, num_attention_heads=HEADS)}, with_state=True)


def test_plan_requests_only_mapped_layers():
    tb, state = _method()
    assert state["teacher_map"] == [0, 2, 4]
    plan = tb.plan(step(), state, 0, None)
    assert plan.models["student"].features == {"embeddings", "layers.0.output", "layers.1.output",
                                               "layers.0.attention.scores", "layers.1.attention.scores"}
    # teacher hidden states 2 and 4 (outputs of layers 1 and 3); attention of the last layer of each block
    assert plan.models["teacher:t"].features == {"embeddings", "layers.1.output", "layers.3.output",
                                                 "layers.1.attention.scores", "layers.3.attention.scores"}
    only_emb, emb_state = _method(attention=False, hidden=False)
    assert set(only_emb.plan(step(), emb_state, 0, None).models["student"].features) == {"embeddings"}


def test_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    sf, tf = _features(S, HS, g), _features(T, HT, g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    for f in (sf, tf):  # padded keys hold the fill value, like the model's masked scores
        for k in f:
            if k.endswith("scores"):
                f[k][1, :, :, 3:] = torch.finfo(torch.float32).min
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    tb, state = _method(prediction=True, temperature=2.0, hidden_weight=0.5)
    terms = tb.loss(step(), state, 0, outputs({"attention_mask": mask}, ModelView(sf, z), {"t": ModelView(tf, zt)}))

    keep = mask.bool()
    assert tb.proj.bias is None  # W_h of eq. 8 of the paper is bias-free
    W = tb.proj.weight
    hidden = sum(((sf[s] @ W.T - tf[t]) ** 2)[keep].mean()
                 for s, t in [("embeddings", "embeddings"), ("layers.0.output", "layers.1.output"),
                              ("layers.1.output", "layers.3.output")])
    assert terms["hidden"].item() == pytest.approx(0.5 * hidden.item(), rel=1e-5)
    valid = (keep[:, None, :, None] & keep[:, None, None, :]).expand(B, HEADS, L, L)
    att = sum(((sf[s] - tf[t]) ** 2)[valid].mean() for s, t in [("layers.0.attention.scores", "layers.1.attention.scores"),
                                                                 ("layers.1.attention.scores", "layers.3.attention.scores")])
    assert terms["attention"].item() == pytest.approx(att.item(), rel=1e-5)
    p = torch.softmax(zt / 2, -1)
    assert terms["prediction"].item() == pytest.approx(-(p * torch.log_softmax(z / 2, -1)).sum(-1).mean().item(), rel=1e-5)
    terms["hidden"].backward()
    assert tb.proj.weight.grad is not None and tb.proj.weight.grad.abs().sum() > 0


def test_random_mapping_is_state_and_resamples_per_block():
    tb, state = _method(layer_mapping="random", random_every_steps=5)
    tb.plan(step(iteration=0, seed=1), state, 0, None)
    first = list(state["teacher_map"])
    tb.plan(step(iteration=3, seed=2), state, 0, None)
    assert state["teacher_map"] == first  # same block: unchanged
    tb.plan(step(iteration=5, seed=99), state, 0, None)
    assert state["map_block"] == 1 and state["teacher_map"][0] == 0 and state["teacher_map"][-1] == T


def test_head_mismatch_is_a_feature_issue_on_the_attention_field():
    ctx = MethodContext(shape(num_attention_heads=2), {"t": shape(num_attention_heads=4)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field == "attention" and issue.model == "teacher 't'"
    assert issue.message.startswith("tinybert: the attention loss needs equal head counts (student 2, teacher 't' 4)")
    assert check_features(SPEC, {"attention": False}, ctx) == []


def test_constructor_raises_the_same_rules():
    with pytest.raises(GkdError, match="equal head counts"):
        build_method("tinybert", {}, student=shape(num_attention_heads=2), teachers={"t": shape(num_attention_heads=4)}, check=False)
    assert build_method("tinybert", {"attention": False}, student=shape(num_attention_heads=2), teachers={"t": shape(num_attention_heads=4)})
    with pytest.raises(GkdError, match="at least as deep as the student"):
        build_method("tinybert", {}, student=shape(num_layers=4), teachers={"t": shape(num_layers=2)}, check=False)


def test_prediction_needs_a_teacher_with_a_head():
    ctx = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "pretrain")
    assert check_features(SPEC, {}, ctx) == []  # general distillation reads no logits
    (issue,) = check_features(SPEC, {"prediction": True}, ctx)
    assert issue.field == "prediction" and "prediction: false" in issue.message


PREDICTION_ONLY = {"hidden": False, "embeddings": False, "attention": False, "prediction": True}


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {"prediction": True}),
    ("encoder", {"layer_mapping": "random", "random_every_steps": 1}),
    ("decoder", {"layer_mapping": "random", "random_every_steps": 1}),
    ("decoder", PREDICTION_ONLY),
])
def test_tinybert_conformance(family, config):
    report = check_conformance("tinybert", config, family=family, steps=3,
                               parameter_grads=config is not PREDICTION_ONLY)  # W_h unused in the prediction step
    if config.get("layer_mapping") == "random":
        assert [s["map_block"] for s in report.states] == [0, 1, 2]
