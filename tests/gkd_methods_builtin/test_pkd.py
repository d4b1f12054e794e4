from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
from gkd_methods_builtin.pkd import SPEC
from gkd_methods_builtin.pkd.method import layer_pairs

B, L, H = 3, 5, 16


def _cfg(**kw):
    return {"layer_strategy": "skip", "use_embed": False, "wo_final": True} | kw


def _method(config=None, family="encoder", s=3, t=6):
    return build_method("pkd", config, student=shape(family, num_layers=s, hidden_size=H),
                        teachers={"t": shape(family, num_layers=t, hidden_size=H)})


def _features(layers, gen):
    return {"embeddings": torch.randn(B, L, H, generator=gen)} | {
        f"layers.{i}.output": torch.randn(B, L, H, generator=gen) for i in range(layers)}


def _mask():
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    return mask


def test_layer_pairs_skip_and_last():
    assert layer_pairs(_cfg(), 6, 12) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]     # the paper's PKD-Skip
    assert layer_pairs(_cfg(layer_strategy="last"), 6, 12) == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert layer_pairs(_cfg(use_embed=True, wo_final=False), 3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert layer_pairs(_cfg(wo_final=False), 3, 7) == [(1, 2), (2, 4), (3, 7)]  # k = 7 // 3; final = last layers
    assert layer_pairs(_cfg(), 1, 4) == [] and layer_pairs(_cfg(), 4, 2) == []


def test_plan_requests_only_the_paired_hidden_states():
    pkd = _method()
    plan = pkd.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"layers.0.output", "layers.1.output"}
    assert plan.models["teacher:t"].features == {"layers.1.output", "layers.3.output"}
    assert pkd.plan(step(), {}, 1, None) is None
    emb = _method({"use_embed": True, "wo_final": False, "layer_strategy": "last"})
    assert emb.plan(step(), {}, 0, None).models["teacher:t"].features == {
        "embeddings", "layers.3.output", "layers.4.output", "layers.5.output"}
    hard_only = _method({"beta": 0, "alpha": 0})
    assert set(hard_only.plan(step(), {}, 0, None).models) == {"student"}


def _norm_mse(s, t):
    s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return ((s - t) ** 2).mean()


def test_loss_matches_formula_on_cls():
    g = torch.Generator().manual_seed(0)
    sf, tf = _features(3, g), _features(6, g)
    z, zt = torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g)
    labels = torch.tensor([0, 3, 1])
    pkd = _method({"alpha": 0.3, "beta": 50.0, "temperature": 4.0})
    terms = pkd.loss(step(), {}, 0, outputs({"attention_mask": _mask(), "labels": labels}, ModelView(sf, z),
                                             {"t": ModelView(tf, zt)}))
    pt = sum(_norm_mse(sf[s][:, 0], tf[t][:, 0]) for s, t in [("layers.0.output", "layers.1.output"),
                                                               ("layers.1.output", "layers.3.output")])
    assert terms["patience"].item() == pytest.approx(50.0 * pt.item(), rel=1e-5)
    p = torch.softmax(zt / 4, -1)
    kl = 16 * (p * (p.log() - torch.log_softmax(z / 4, -1))).sum(-1).mean()
    assert terms["soft"].item() == pytest.approx(0.3 * kl.item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.7 * F.cross_entropy(z, labels).item(), rel=1e-5)


def test_all_tokens_skip_padding_and_unnormalised_is_plain_mse():
    g = torch.Generator().manual_seed(1)
    sf, tf = _features(3, g), _features(6, g)
    mask = _mask()
    keep = mask.bool()
    view = outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)})
    cfg = {"only_cls": False, "alpha": 0.0, "wo_final": False}
    pairs = [("layers.0.output", "layers.1.output"), ("layers.1.output", "layers.3.output"),
             ("layers.2.output", "layers.5.output")]
    terms = _method(cfg).loss(step(), {}, 0, view)
    expected = sum(_norm_mse(sf[s][keep], tf[t][keep]) for s, t in pairs)
    assert terms["patience"].item() == pytest.approx(100 * expected.item(), rel=1e-5)
    raw = _method(cfg | {"normalized": False}).loss(step(), {}, 0, view)
    expected = sum(((sf[s] - tf[t]) ** 2)[keep].mean() for s, t in pairs)
    assert raw["patience"].item() == pytest.approx(100 * expected.item(), rel=1e-5)
    assert set(terms) == {"patience"}  # alpha 0 and no labels: no prediction terms


def test_decoder_summary_token_is_the_last_real_token():
    g = torch.Generator().manual_seed(2)
    sf, tf = _features(3, g), _features(6, g)
    mask = _mask()  # example 1 has 3 real tokens
    left = mask.clone()
    left[2] = torch.tensor([0, 0, 1, 1, 1])  # left padding works too
    pkd = _method({"alpha": 0.0}, family="decoder")
    terms = pkd.loss(step(), {}, 0, outputs({"attention_mask": left}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    last = torch.tensor([4, 2, 4])
    rows = torch.arange(B)
    pt = sum(_norm_mse(sf[s][rows, last], tf[t][rows, last]) for s, t in [("layers.0.output", "layers.1.output"),
                                                                           ("layers.1.output", "layers.3.output")])
    assert terms["patience"].item() == pytest.approx(100 * pt.item(), rel=1e-5)


def test_token_logits_soft_term_skips_padding():
    g = torch.Generator().manual_seed(3)
    z, zt = torch.randn(B, L, 9, generator=g), torch.randn(B, L, 9, generator=g)
    mask = _mask()
    pkd = _method({"beta": 0, "alpha": 1.0, "soft_loss": "ce", "temperature": 2.0}, family="decoder")
    terms = pkd.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView({}, z), {"t": ModelView({}, zt)}))
    per_pos = -(torch.softmax(zt / 2, -1) * torch.log_softmax(z / 2, -1)).sum(-1)
    assert set(terms) == {"soft"}
    assert terms["soft"].item() == pytest.approx(per_pos[mask.bool()].mean().item(), rel=1e-5)


def test_checks_name_the_field_and_the_models():
    def issues(config, s, t, head=None):
        ctx = MethodContext(s, {"t": t if head is None else shape(num_layers=t.num_layers, head=head)},
                            "sequence_classification", "task")
        return check_features(SPEC, config, ctx)

    (issue,) = issues({}, shape(num_layers=4), shape(num_layers=2))
    assert issue.field is None and "student has 4 layers and teacher 't' 2" in issue.message
    (issue,) = issues({}, shape(num_layers=2, hidden_size=16), shape(num_layers=4, hidden_size=32))
    assert issue.field == "beta" and issue.model == "teacher 't'"
    assert "student has hidden_size 16 and teacher 't' 32" in issue.message
    assert issues({"beta": 0}, shape(num_layers=2, hidden_size=16), shape(num_layers=4, hidden_size=32)) == []
    (issue,) = issues({}, shape(num_layers=1), shape(num_layers=4))
    assert issue.field == "wo_final" and "no intermediate layer" in issue.message
    (issue,) = issues({}, shape(num_layers=2), shape(num_layers=4), head="none")
    assert issue.field == "alpha" and issue.message.startswith("pkd: teacher 't' has no task head")
    assert issues({"alpha": 0}, shape(num_layers=2), shape(num_layers=4), head="none") == []
    with pytest.raises(GkdError, match="at least as deep"):
        build_method("pkd", {}, student=shape(num_layers=4), teachers={"t": shape(num_layers=2)}, check=False)


def test_exclusive_claims_the_hard_loss_while_alpha_below_one():
    assert SPEC.factory.exclusive({"alpha": 0.5}) == {"hard_loss": "alpha"}
    assert SPEC.factory.exclusive({"alpha": 1.0}) == {}


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, None),
    ("encoder", None, {"layer_strategy": "last", "only_cls": False, "use_embed": True, "wo_final": False}),
    ("encoder", "masked_lm", {"soft_loss": "ce"}),
    ("decoder", None, None),
    ("decoder", None, {"only_cls": False, "normalized": False, "layer_strategy": "last"}),
])
def test_pkd_conformance(family, task, config):
    report = check_conformance("pkd", config, family=family, task=task, student_layers=2, teacher_layers=4)
    assert set(report.terms[0]) == {"patience", "soft", "hard"}


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_pkd_terms_decrease_on_tiny_models(family):
    models = tiny_models(family, student_layers=3, teacher_layers=6)
    pkd = build_method("pkd", {"temperature": 2.0, "alpha": 1.0}, models=models)  # random labels would fight the soft term
    batch = tiny_batch(family)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(15):
        result = run_step(pkd, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in result.terms.items()})
    for term in ("pkd.patience", "pkd.soft"):
        assert history[-1][term] < 0.7 * history[0][term], (term, history[0][term], history[-1][term])
