from __future__ import annotations

import math

import pytest
import torch

from gkd.methods import GkdError, MethodContext, ModelView, check_features
from gkd.testing import (
    build_method,
    check_conformance,
    outputs,
    run_step,
    shape,
    step,
    tiny_batch,
    tiny_models,
)
from gkd_methods_builtin.minilmv2 import SPEC

B, L = 3, 6
# Student: 4 heads of 8 (kv: 2 heads for decoders); teacher: 8 heads of 8 (kv: 4). R = 4.
S_HEADS, T_HEADS, D, R = 4, 8, 8, 4


def _shapes(family):
    gqa = family == "decoder"
    return (shape(family, num_layers=2, hidden_size=S_HEADS * D, num_attention_heads=S_HEADS, num_kv_heads=2 if gqa else None),
            shape(family, num_layers=4, hidden_size=T_HEADS * D, num_attention_heads=T_HEADS, num_kv_heads=4 if gqa else None))


def _method(family="encoder", **config):
    s, t = _shapes(family)
    return build_method("minilmv2", {"teacher_layer": 3, "relation_heads": R, **config}, student=s, teachers={"t": t})


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    return mask


def _features(family, seed=0):
    s_shape, t_shape = _shapes(family)
    g = torch.Generator().manual_seed(seed)
    s, t = {}, {}
    for kind in ("query", "key", "value"):
        sh = s_shape.num_attention_heads if kind == "query" else s_shape.num_kv_heads
        th = t_shape.num_attention_heads if kind == "query" else t_shape.num_kv_heads
        s[f"layers.1.attention.{kind}"] = torch.randn(B, sh, L, D, generator=g)
        t[f"layers.2.attention.{kind}"] = 2 * torch.randn(B, th, L, D, generator=g)
    return s, t


def _relation_kl(xs: torch.Tensor, xt: torch.Tensor, mask: torch.Tensor, causal: bool) -> float:
    """MiniLMv2's relation KL by hand: concatenate heads, split into R relation heads,
    softmax(X_r·X_rᵀ/√d_r) over the real (past) keys, KL per real query row, mean over all."""
    rows = []
    for b in range(B):
        n = int(mask[b].sum())
        cs = xs[b].permute(1, 0, 2).reshape(L, -1)  # [L, heads·d]
        ct = xt[b].permute(1, 0, 2).reshape(L, -1)
        for a_s, a_t in zip(cs.chunk(R, -1), ct.chunk(R, -1), strict=True):
            rel_s, rel_t = a_s @ a_s.T / math.sqrt(a_s.shape[-1]), a_t @ a_t.T / math.sqrt(a_t.shape[-1])
            for q in range(n):
                k = q + 1 if causal else n
                p, r = torch.softmax(rel_t[q, :k], -1), torch.softmax(rel_s[q, :k], -1)
                rows.append((p * (p.log() - r.log())).sum())
    return torch.stack(rows).mean().item()


@pytest.mark.parametrize(("family", "padded"), [("encoder", False), ("encoder", True), ("decoder", True)])
def test_loss_matches_the_paper(family, padded):
    causal = family == "decoder"
    mask = _mask() if padded else torch.ones(B, L, dtype=torch.long)
    s, t = _features(family)
    m = _method(family, key_weight=0.5)
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(s, None), {"t": ModelView(t, None)}))
    assert set(terms) == {"query", "key", "value"}
    for kind, w in (("query", 1.0), ("key", 0.5), ("value", 1.0)):
        want = _relation_kl(s[f"layers.1.attention.{kind}"], t[f"layers.2.attention.{kind}"], mask, causal)
        assert terms[kind].item() == pytest.approx(w * want, rel=1e-5), kind


def test_padded_positions_do_not_matter():
    mask = _mask()
    s, t = _features("decoder")
    m = _method("decoder")

    def view(s, t):
        return outputs({"attention_mask": mask}, ModelView(s, None), {"t": ModelView(t, None)})

    before = m.loss(step(), {}, 0, view(s, t))
    pad = ~mask.bool()[:, None, :, None]
    g = torch.Generator().manual_seed(3)
    s2 = {k: torch.where(pad, 1e3 * torch.randn(v.shape, generator=g), v) for k, v in s.items()}
    t2 = {k: torch.where(pad, 1e3 * torch.randn(v.shape, generator=g), v) for k, v in t.items()}
    after = m.loss(step(), {}, 0, view(s2, t2))
    for k in before:
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-6)


def test_plan_and_layers():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {f"layers.1.attention.{k}" for k in ("query", "key", "value")}
    assert plan.models["teacher:t"].features == {f"layers.2.attention.{k}" for k in ("query", "key", "value")}
    assert m.plan(step(), {}, 1, None) is None
    m = _method(teacher_layer=-1, query_weight=0, key_weight=0)
    assert m.plan(step(), {}, 0, None).models["teacher:t"].features == {"layers.3.attention.value"}


def test_shape_rules_name_the_field_and_models():
    s, t = _shapes("decoder")  # query widths 32 / 64, key/value widths 16 / 32
    ctx = MethodContext(s, {"t": t}, "causal_lm", "pretrain")
    assert check_features(SPEC, {"teacher_layer": 4, "relation_heads": 16}, ctx) == []
    issues = check_features(SPEC, {"teacher_layer": 4, "relation_heads": 32}, ctx)
    assert [(i.field, i.model) for i in issues] == [("relation_heads", "student")]
    assert issues[0].message == ("minilmv2: relation_heads is 32, which does not divide the concatenated width of the "
                                 "student's key/value heads (16 = key/value heads × head size 8); use a divisor of 16")
    # Only the relations that are on count: queries alone are 32 wide.
    assert check_features(SPEC, {"teacher_layer": 4, "relation_heads": 32, "key_weight": 0, "value_weight": 0},
                          ctx) == []
    issues = check_features(SPEC, {"teacher_layer": 4, "relation_heads": 3}, ctx)
    assert {(i.field, i.model) for i in issues} == {("relation_heads", "student"), ("relation_heads", "teacher 't'")}
    # The reference's default teacher layer 12 does not exist in a 4-layer teacher.
    (issue,) = check_features(SPEC, {"relation_heads": 4}, ctx)
    assert issue.field == "teacher_layer" and issue.model == "teacher 't'"
    assert "teacher_layer is 12, but teacher 't' has 4 layers" in issue.message
    with pytest.raises(GkdError, match="relation_heads is 48"):
        build_method("minilmv2", {"teacher_layer": 1}, student=s, teachers={"t": t}, check=False)


def test_terms_decrease_on_tiny_models():
    models = tiny_models("decoder")
    method = build_method("minilmv2", {"teacher_layer": -1, "relation_heads": 4}, models=models)
    batch = tiny_batch("decoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(15):
        opt.zero_grad()
        result = run_step(method, models, batch, iteration=i, total=15)
        result.loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in result.terms.items()})
    for term in ("minilmv2.query", "minilmv2.key", "minilmv2.value"):
        assert history[-1][term] < 0.7 * history[0][term], (term, history[0][term], history[-1][term])


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {"teacher_layer": 4, "relation_heads": 4}),
    ("encoder", {"teacher_layer": -2, "relation_heads": 8, "value_weight": 0}),
    ("decoder", {"teacher_layer": 3, "relation_heads": 2}),
])
def test_conformance(family, config):
    check_conformance("minilmv2", config, family=family)
