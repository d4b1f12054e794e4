from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import MethodContext, ModelView, check_features
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
from gkd_methods_builtin.mgskd import SPEC
from gkd_methods_builtin.mgskd.relations import draw_spans

S, T, H, HEADS, B, L = 2, 4, 8, 2, 4, 6


def _method(family: str = "encoder", **config):
    cfg = {"relation_heads": HEADS, "triplet_k1": 3, "triplet_k2": 3} | config
    return build_method("mgskd", cfg, student=shape(family, num_layers=S, hidden_size=H),
                        teachers={"t": shape(family, num_layers=T, hidden_size=H)})


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 3:] = 0
    return mask


# ---- the published formulas, example by example, with plain torch


def _heads(x: torch.Tensor) -> torch.Tensor:  # [n, d] -> [heads, n, d/heads]
    return x.view(x.shape[0], HEADS, -1).transpose(0, 1)


def _pairs(x: torch.Tensor) -> torch.Tensor:  # φ(x_i, x_j) = <x_i, x_j>/√d_h per head
    xh = _heads(x)
    return xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])


def _cos_angle(a: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # ψ at vertex a
    return F.cosine_similarity(j - a, k - a, dim=-1, eps=1e-12)


def _token_level(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, k1: int = 3, k2: int = 3) -> torch.Tensor:
    sq, n_pairs, triplet, n_triplets = 0.0, 0, 0.0, 0
    for b in range(s.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        xs, xt = s[b, real], t[b, real]
        ps, pt = _pairs(xs), _pairs(xt)
        sq, n_pairs = sq + ((ps - pt) ** 2).sum(), n_pairs + ps.numel()
        att = torch.softmax(pt, -1)  # relation attention of the teacher over real tokens
        importance = att.sum((0, 1))
        for a in importance.topk(min(k1, len(real))).indices.tolist():
            local = att.sum(0)[a].clone()
            local[a] = -math.inf
            near = local.topk(min(k2, len(real) - 1)).indices.tolist()
            for j, k in itertools.permutations(near, 2):
                triplet = triplet + F.smooth_l1_loss(_cos_angle(xs[a], xs[j], xs[k]), _cos_angle(xt[a], xt[j], xt[k]))
                n_triplets += 1
    return sq / n_pairs + triplet / max(n_triplets, 1)


def _sample_level(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ps = torch.stack([s[b][mask[b].bool()].mean(0) for b in range(s.shape[0])])
    pt = torch.stack([t[b][mask[b].bool()].mean(0) for b in range(t.shape[0])])
    hs, ht = _heads(ps), _heads(pt)
    total, count = 0.0, 0
    for h in range(HEADS):
        for i, j, k in itertools.permutations(range(s.shape[0]), 3):
            a = _cos_angle(hs[h, i], hs[h, j], hs[h, k])
            total, count = total + F.smooth_l1_loss(a, _cos_angle(ht[h, i], ht[h, j], ht[h, k])), count + 1
    return total / count


def _features(layers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    feats = {"embeddings": torch.randn(B, L, H, generator=gen)}
    return feats | {f"layers.{i}.output": torch.randn(B, L, H, generator=gen) for i in range(layers)}


def _view(sf, tf, mask):
    return outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)})


def test_plan_uses_stride_layers_and_the_last_hidden_state():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"embeddings", "layers.0.output", "layers.1.output"}
    assert plan.models["teacher:t"].features == {"embeddings", "layers.1.output", "layers.3.output"}  # 0, 2, T
    odd = build_method("mgskd", {"relation_heads": 2}, student=shape(num_layers=2, hidden_size=8),
                       teachers={"t": shape(num_layers=5, hidden_size=8)})
    assert odd.pairs() == [("embeddings", "embeddings"), ("layers.0.output", "layers.1.output"),
                           ("layers.1.output", "layers.4.output")]
    assert _method(intermediate=False, soft_weight=1.0).plan(step(), {}, 0, None).models["student"].features == set()


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_token_and_sample_terms_match_the_formulas_and_ignore_padding(family):
    m = _method(family, span_max_rate=0.0, token_weight=0.5, sample_weight=4.0)
    g = torch.Generator().manual_seed(0)
    sf, tf, mask = _features(S, g), _features(T, g), _mask()
    terms = m.loss(step(), {}, 0, _view(sf, tf, mask))
    assert set(terms) == {"token", "sample"}  # span level off with span_max_rate 0
    token = (_token_level(sf["embeddings"], tf["embeddings"], mask)
             + _token_level(sf["layers.0.output"], tf["layers.1.output"], mask))
    assert terms["token"].item() == pytest.approx(0.5 * token.item(), rel=1e-5)
    sample = _sample_level(sf["layers.1.output"], tf["layers.3.output"], mask)
    assert terms["sample"].item() == pytest.approx(4.0 * sample.item(), rel=1e-5)
    for f in (sf, tf):  # padded positions hold anything: nothing moves
        for v in f.values():
            v[~mask.bool()] = 1e3
    again = m.loss(step(), {}, 0, _view(sf, tf, mask))
    for k in terms:
        assert again[k].item() == pytest.approx(terms[k].item(), rel=1e-5)


def test_span_level_with_one_token_per_span_equals_the_token_level():
    m = _method(span_max_rate=1.0, sample_level_m=3)
    g = torch.Generator().manual_seed(1)
    sf, tf, mask = _features(S, g), _features(T, g), _mask()
    terms = m.loss(step(seed=4), {}, 0, _view(sf, tf, mask))
    assert set(terms) == {"token", "span"}  # all three pairs are lower layers
    assert terms["span"].item() == pytest.approx(terms["token"].item(), rel=1e-5)


def test_span_level_matches_the_formula_on_the_drawn_spans():
    m = _method(span_max_rate=0.5, token_weight=0.0, sample_weight=0.0, span_weight=2.0)
    g = torch.Generator().manual_seed(2)
    sf, tf, mask = _features(S, g), _features(T, g), _mask()
    terms = m.loss(step(seed=7), {}, 0, _view(sf, tf, mask))
    assert set(terms) == {"span"}
    assign, spans = draw_spans(mask, 0.5, torch.Generator().manual_seed(7))
    expected = 0.0
    for s_tap, t_tap in [("embeddings", "embeddings"), ("layers.0.output", "layers.1.output")]:
        means_s = torch.stack([torch.stack([sf[s_tap][b][a].mean(0) if a.any() else torch.zeros(H) for a in assign[b]])
                               for b in range(B)])
        means_t = torch.stack([torch.stack([tf[t_tap][b][a].mean(0) if a.any() else torch.zeros(H) for a in assign[b]])
                               for b in range(B)])
        expected = expected + _token_level(means_s, means_t, spans.long())
    assert terms["span"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)


def test_spans_partition_the_real_tokens_into_contiguous_runs():
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    mask[3, :] = 0
    mask[4, :3] = 0  # left padding too
    assign, spans = draw_spans(mask, 0.4, torch.Generator().manual_seed(0))
    lengths = mask.sum(1)
    for b in range(5):
        assert int(spans[b].sum()) == (max(1, int(0.4 * lengths[b])) if lengths[b] else 0)
        owner = assign[b].long().argmax(0)
        assert (assign[b].sum(0) == mask[b]).all()  # every real token in exactly one span, padding in none
        real = owner[mask[b].bool()].tolist()
        assert real == sorted(real) and (not real or set(real) == set(range(real[-1] + 1)))  # contiguous, in order
    again, _ = draw_spans(mask, 0.4, torch.Generator().manual_seed(0))
    other, _ = draw_spans(mask, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(assign, again) and not torch.equal(assign, other)


def test_a_batch_of_two_has_no_sample_triplet():
    m = _method(token_weight=0.0, span_weight=0.0, sample_level_m=0)
    g = torch.Generator().manual_seed(3)
    sf = {k: v[:2] for k, v in _features(S, g).items()}
    tf = {k: v[:2] for k, v in _features(T, g).items()}
    terms = m.loss(step(), {}, 0, _view(sf, tf, _mask()[:2]))
    assert terms["sample"].item() == 0.0


def test_checks_name_the_field():
    ctx = MethodContext(shape(hidden_size=32), {"t": shape(hidden_size=48)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {"relation_heads": 32}, ctx)
    assert issue.field == "relation_heads" and issue.model == "teacher 't'" and "has 48" in issue.message
    assert check_features(SPEC, {"relation_heads": 16}, ctx) == []
    assert check_features(SPEC, {"relation_heads": 32, "intermediate": False, "soft_weight": 1.0}, ctx) == []
    deep = MethodContext(shape(num_layers=4, hidden_size=64), {"t": shape(num_layers=2, hidden_size=64)},
                         "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, deep)
    assert issue.field is None and "at least as deep" in issue.message
    headless = MethodContext(shape(hidden_size=64), {"t": shape(hidden_size=64, head="none")},
                             "sequence_classification", "pretrain")
    assert check_features(SPEC, {}, headless) == []
    (issue,) = check_features(SPEC, {"soft_weight": 1.0}, headless)
    assert issue.field == "soft_weight"
    (issue,) = check_features(SPEC, {"intermediate": False}, headless)
    assert issue.field == "intermediate" and "adds no loss" in issue.message
    assert SPEC.factory.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive({"hard_weight": 0.0}) == {}


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {"relation_heads": 4}),
    ("encoder", {"relation_heads": 8, "span_max_rate": 0.0, "sample_level_m": 1, "soft_weight": 1.0,
                 "hard_weight": 1.0}),
    ("decoder", {"relation_heads": 4}),
    ("decoder", {"intermediate": False, "soft_weight": 1.0, "soft_loss": "kl"}),
])
def test_mgskd_conformance(family, config):
    check_conformance("mgskd", config, family=family, steps=2)


def test_training_decreases_every_structural_term():
    models = tiny_models("encoder")
    method = build_method("mgskd", {"relation_heads": 4, "triplet_k1": 4, "triplet_k2": 4}, models=models)
    batch = tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam(models["student"].parameters(), lr=2e-3)
    history = []
    for _ in range(15):
        result = run_step(method, models, batch, iteration=0)  # same step: the same spans every time
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in result.terms.items()})
    assert set(history[0]) == {"mgskd.token", "mgskd.span", "mgskd.sample"}
    for k in history[0]:
        assert history[-1][k] < 0.8 * history[0][k], (k, history[0][k], history[-1][k])
