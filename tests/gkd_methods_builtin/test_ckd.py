from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import GkdError, MethodContext, ModelView, check_features
from gkd.testing import (
    build_method,
    check_conformance,
    outputs,
    run_step,
    selected,
    shape,
    step,
    tiny_batch,
    tiny_models,
)
from gkd_methods_builtin.ckd import SPEC

S, T, HS, HT, B, L = 3, 6, 6, 10, 3, 7
STUDENT_TAPS = ["embeddings", "layers.0.output", "layers.1.output", "layers.2.output"]
TEACHER_TAPS = ["embeddings", "layers.1.output", "layers.3.output", "layers.5.output"]  # uniform map [0, 2, 4, 6]
RELATIONS_ONLY = {"soft_weight": 0, "hard_weight": 0}


def _method(config=None, family="encoder", **kw):
    return build_method("ckd", config, student=shape(family, num_layers=S, hidden_size=HS),
                        teachers={"t": shape(family, num_layers=T, hidden_size=HT)}, **kw)


def _features(taps: list[str], h: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {tap: torch.randn(B, L, h, generator=g) for tap in taps}


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


# ---- the paper's relations, written out token by token (right padding: real tokens are 0..n-1)

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=0)


def _angle(vertex: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos∠(a, vertex, b) = <(a−v)/|a−v|, (b−v)/|b−v|>."""
    return torch.dot(F.normalize(a - vertex, dim=0), F.normalize(b - vertex, dim=0))


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(teacher_logits, 0)
    return (p * (p.log() - torch.log_softmax(student_logits, 0))).sum()


def _context(n: int, i: int, causal: bool, half: int | None = None) -> list[int]:
    return [j for j in range(n) if j != i and (not causal or j < i) and (half is None or abs(j - i) <= half)]


def _wr_dist(s, t, lengths, causal):
    total, rows = torch.zeros(()), 0
    for b, n in enumerate(lengths):
        for i in range(n):
            js = _context(n, i, causal)
            if not js:
                continue
            rows += 1
            for sl, tl in zip(s, t, strict=True):
                total += _kl(torch.stack([_cos(sl[b, i], sl[b, j]) for j in js]),
                             torch.stack([_cos(tl[b, i], tl[b, j]) for j in js]))
    return total / rows


def _wr_angle(s, t, lengths, window, causal):
    total, rows = torch.zeros(()), 0
    for b, n in enumerate(lengths):
        for i in range(n):
            js = _context(n, i, causal, window // 2)
            pairs = [(j, k) for j, k in itertools.product(js, js) if j != k]
            if not pairs:
                continue
            rows += 1
            for sl, tl in zip(s, t, strict=True):
                for j, k in pairs:
                    total += (_angle(sl[b, i], sl[b, j], sl[b, k]) - _angle(tl[b, i], tl[b, j], tl[b, k])) ** 2
    return total / rows


def _ltr_dist(s, t, lengths):
    total, layers = torch.zeros(()), range(len(s))
    for b, n in enumerate(lengths):
        for i, a in itertools.product(range(n), layers):
            others = [m for m in layers if m != a]
            total += _kl(torch.stack([_cos(s[a][b, i], s[m][b, i]) for m in others]),
                         torch.stack([_cos(t[a][b, i], t[m][b, i]) for m in others]))
    return total / sum(lengths)


def _ltr_angle(s, t, lengths):
    total, layers = torch.zeros(()), range(len(s))
    for b, n in enumerate(lengths):
        for i in range(n):
            for v, m, k in itertools.permutations(layers, 3):  # vertex layer v
                total += (_angle(s[v][b, i], s[m][b, i], s[k][b, i]) - _angle(t[v][b, i], t[m][b, i], t[k][b, i])) ** 2
    return total / sum(lengths)


def test_plan_pairs_embeddings_and_uniform_teacher_blocks():
    m, state = _method(with_state=True)
    plan = m.plan(step(), state, 0, None)
    assert plan.models["student"].features == set(STUDENT_TAPS)
    assert plan.models["teacher:t"].features == set(TEACHER_TAPS)
    assert m.plan(step(), state, 1, None) is None
    off = {f"{r}_weight": 0 for r in ("wr_dist", "wr_angle", "ltr_dist", "ltr_angle")}
    none = _method(off | {"soft_weight": 0})
    assert set(none.plan(step(), {}, 0, None).models) == {"student"}


@pytest.mark.parametrize(("family", "window"), [("encoder", 21), ("encoder", 3), ("decoder", 5)])
def test_relations_match_the_paper_and_skip_padding(family, window):
    g = torch.Generator().manual_seed(0)
    sf, tf = _features(STUDENT_TAPS, HS, g), _features(TEACHER_TAPS, HT, g)
    mask = _mask()
    weights = {"wr_dist_weight": 0.5, "wr_angle_weight": 2.0, "ltr_dist_weight": 3.0, "ltr_angle_weight": 0.25}
    m = _method(weights | RELATIONS_ONLY | {"window_size": window}, family=family)
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    s, t, lengths = [sf[k] for k in STUDENT_TAPS], [tf[k] for k in TEACHER_TAPS], mask.sum(-1).tolist()
    causal = family == "decoder"
    expected = {"wr_dist": 0.5 * _wr_dist(s, t, lengths, causal), "wr_angle": 2.0 * _wr_angle(s, t, lengths, window, causal),
                "ltr_dist": 3.0 * _ltr_dist(s, t, lengths), "ltr_angle": 0.25 * _ltr_angle(s, t, lengths)}
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-6), k
    keep = mask.bool()
    for f in (sf, tf):  # what padded positions hold never matters
        for v in f.values():
            v[~keep] = 50.0
    again = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    for k in expected:
        assert again[k].item() == pytest.approx(terms[k].item(), rel=1e-5, abs=1e-7), k


def test_prediction_terms_and_hard_loss_claim():
    g = torch.Generator().manual_seed(1)
    sf, tf = _features(STUDENT_TAPS, HS, g), _features(TEACHER_TAPS, HT, g)
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    batch = {"attention_mask": _mask(), "labels": torch.tensor([1, 0, 2])}
    m = _method({"temperature": 3.0, "soft_weight": 0.9, "hard_weight": 0.1})
    terms = m.loss(step(), {}, 0, outputs(batch, ModelView(sf, z), {"t": ModelView(tf, zt)}))
    p = torch.softmax(zt / 3, -1)
    assert terms["soft"].item() == pytest.approx(0.9 * -(p * torch.log_softmax(z / 3, -1)).sum(-1).mean().item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.1 * F.cross_entropy(z, batch["labels"]).item(), rel=1e-5)
    assert SPEC.factory.exclusive(m.config) == {"hard_loss": "hard_weight"}


def test_shallow_teacher_and_missing_teacher_logits_are_config_issues():
    ctx = MethodContext(shape(num_layers=4), {"t": shape(num_layers=2)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, RELATIONS_ONLY, ctx)
    assert issue.model == "teacher 't'" and issue.message.startswith("ckd: maps every student layer onto a teacher layer")
    with pytest.raises(GkdError, match="at least as deep as the student"):
        build_method("ckd", RELATIONS_ONLY, student=ctx.student, teachers=ctx.teachers, check=False)
    no_head = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, no_head)
    assert issue.field == "soft_weight"
    assert check_features(SPEC, {"soft_weight": 0}, no_head) == []


def test_long_sequences_of_wide_models_stay_cheap():
    """s = 128, 768 wide: the window angles come from [s, s] Gram matrices (b·L·s·W² entries), never
    from [s, W, d] difference vectors."""
    m = build_method("ckd", RELATIONS_ONLY, student=shape(num_layers=2, hidden_size=768, num_attention_heads=12),
                     teachers={"t": shape(num_layers=2, hidden_size=768, num_attention_heads=12)})
    g = torch.Generator().manual_seed(2)
    taps = ["embeddings", "layers.0.output", "layers.1.output"]
    b, s = 4, 128
    feats = {tap: torch.randn(b, s, 768, generator=g) for tap in taps}
    view = outputs({"attention_mask": torch.ones(b, s, dtype=torch.long)}, ModelView(feats, None),
                   {"t": ModelView({k: v.flip(1) for k, v in feats.items()}, None)})
    terms = m.loss(step(), {}, 0, view)
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {}),
    ("encoder", {"window_size": 3, "soft_loss": "kl", "hard_weight": 0}),
    ("decoder", {}),
    ("decoder", {"wr_dist_weight": 0, "ltr_angle_weight": 0, "soft_weight": 0}),
])
def test_ckd_conformance(family, config):
    check_conformance("ckd", config, family=family)


def test_relation_terms_decrease_on_tiny_models():
    models = tiny_models("decoder", student_hidden_size=16)
    with torch.no_grad():  # tiny random layers barely change their input: give the teacher's layers more effect
        for name, p in models["teacher:t"].named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
    # ltr_dist is small next to the angle terms at their default weights: weight it up to see it move
    method = build_method("ckd", RELATIONS_ONLY | {"ltr_dist_weight": 10.0}, models=models)
    sel, batch = selected(method), tiny_batch("decoder", seq=12)
    opt = torch.optim.Adam(models["student"].parameters(), lr=1e-2)
    history = []
    for _ in range(15):
        opt.zero_grad()
        result = run_step(sel, models, batch)
        result.loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in result.terms.items()})
    assert set(history[0]) == {"ckd.wr_dist", "ckd.wr_angle", "ckd.ltr_dist", "ckd.ltr_angle"}
    for term in history[0]:
        assert history[-1][term] < 0.8 * history[0][term], (term, [h[term] for h in history])
