from __future__ import annotations

import pytest
import torch

from gkd.errors import GkdError
from gkd.methods.api import ModelView
from gkd.testing import build_method, outputs, shape, step

S, T, HS, HT, HEADS, B, L = 2, 4, 16, 32, 4, 3, 5


def _features(layers: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    feats = {"embeddings": torch.randn(B, L, hidden, generator=gen)}
    for i in range(layers):
        feats[f"layers.{i}.output"] = torch.randn(B, L, hidden, generator=gen)
        feats[f"layers.{i}.attention.scores"] = torch.randn(B, HEADS, L, L, generator=gen)
    return feats


def _method(**config):
    return build_method("tinybert", config, student=shape(num_layers=S, hidden_size=HS, num_heads=HEADS),
                        teachers={"t": shape(num_layers=T, hidden_size=HT, num_heads=HEADS)})


def test_plan_requests_only_mapped_layers():
    tb = _method()
    state = tb.initial_state()
    assert state["teacher_map"] == [0, 2, 4]
    plan = tb.plan(step(), state, 0, None)
    assert plan.models["student"].features == {"embeddings", "layers.0.output", "layers.1.output",
                                               "layers.0.attention.scores", "layers.1.attention.scores"}
    # teacher hidden states 2 and 4 (outputs of layers 1 and 3); attention of the last layer of each block
    assert plan.models["teacher:t"].features == {"embeddings", "layers.1.output", "layers.3.output",
                                                 "layers.1.attention.scores", "layers.3.attention.scores"}
    assert set(_method(attention=False, hidden=False).plan(step(), state, 0, None).models["student"].features) == {"embeddings"}


def test_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    sf, tf = _features(S, HS, g), _features(T, HT, g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    for f in (sf, tf):  # padded keys hold the fill value, like the model's masked scores
        for k in f:
            if k.endswith("scores"):
                f[k][1, :, :, 3:] = -1e4
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    tb = _method(prediction=True, temperature=2.0, hidden_weight=0.5)
    state = tb.initial_state()
    terms = tb.loss(step(), state, 0, outputs({"attention_mask": mask}, ModelView(sf, z), {"t": ModelView(tf, zt)}))

    keep = mask.bool()
    W, bias = tb.proj.weight, tb.proj.bias
    hidden = sum(((sf[s] @ W.T + bias - tf[t]) ** 2)[keep].mean()
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
    tb = _method(layer_mapping="random", random_every_steps=5)
    state = tb.initial_state()
    tb.plan(step(iteration=0, seed=1), state, 0, None)
    first = list(state["teacher_map"])
    tb.plan(step(iteration=3, seed=2), state, 0, None)
    assert state["teacher_map"] == first  # same block: unchanged
    tb.plan(step(iteration=5, seed=99), state, 0, None)
    assert state["map_block"] == 1 and state["teacher_map"][0] == 0 and state["teacher_map"][-1] == T


def test_head_mismatch_is_a_clear_error():
    with pytest.raises(GkdError, match="equal head counts"):
        build_method("tinybert", {}, student=shape(num_heads=2), teachers={"t": shape(num_heads=4)})
    assert build_method("tinybert", {"attention": False}, student=shape(num_heads=2), teachers={"t": shape(num_heads=4)})
