from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import GkdError, ModelView
from gkd.models import build_model
from gkd.testing import (
    build_method,
    check_conformance,
    outputs,
    run_step,
    selected,
    shape,
    step,
    tiny_batch,
    tiny_config,
    tiny_models,
)
from gkd_methods_multiteacher.mt_bert import SPEC
from gkd_methods_multiteacher.mt_bert.method import layer_pairs, module_key

B, L, HS = 3, 5, 8
WIDTHS = {"deep": 12, "shallow": 16}
DEPTHS = {"deep": 6, "shallow": 3}
DEFAULTS = {"use_embed": False, "wo_final": False}


def _method(config=None, family="encoder", student_layers=2, widths=WIDTHS, depths=DEPTHS):
    return build_method("mt-bert", config, student=shape(family, num_layers=student_layers, hidden_size=HS),
                        teachers={n: shape(family, num_layers=depths[n], hidden_size=widths[n]) for n in depths},
                        seed=0)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return mask


def _hidden(layers: int, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"embeddings": torch.randn(B, L, width, generator=g)} | {
        f"layers.{i}.output": torch.randn(B, L, width, generator=g) for i in range(layers)}


def test_layer_pairs_follow_each_teachers_depth():
    assert layer_pairs(DEFAULTS, 2, 6) == [(1, 3), (2, 6)]
    assert layer_pairs(DEFAULTS, 2, 3) == [(1, 1), (2, 3)]        # k = 1; the final pair still ends at T
    assert layer_pairs(DEFAULTS, 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert layer_pairs({"use_embed": True, "wo_final": True}, 3, 12) == [(0, 0), (1, 4), (2, 8)]
    assert layer_pairs(DEFAULTS, 4, 3) == []


def test_plan_requests_each_teachers_stride_pairs_and_logits():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"layers.0.output", "layers.1.output"}
    assert plan.models["teacher:deep"].features == {"layers.2.output", "layers.5.output"}
    assert plan.models["teacher:shallow"].features == {"layers.0.output", "layers.2.output"}
    assert m.plan(step(), {}, 1, None) is None
    only_soft = _method({"beta": 0})
    plan = only_soft.plan(step(), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:deep", "teacher:shallow"}
    assert all(not r.features for r in plan.models.values())
    assert len(only_soft.proj) == 0 and not list(only_soft.parameters())


def test_one_projection_per_teacher_of_its_own_width():
    m = _method()
    assert set(m.proj) == {"deep", "shallow"}
    assert (m.proj["deep"].in_features, m.proj["deep"].out_features) == (12, HS)
    assert (m.proj["shallow"].in_features, m.proj["shallow"].out_features) == (16, HS)
    to_teacher = _method({"project": "student"})
    assert (to_teacher.proj["shallow"].in_features, to_teacher.proj["shallow"].out_features) == (HS, 16)
    dotted = build_method("mt-bert", student=shape(num_layers=2), teachers={"bert.large": shape(), "b": shape(3)})
    assert module_key("bert.large") == "bert:large" and set(dotted.proj) == {"bert:large", "b"}


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_soft_term_weights_every_example_by_the_teachers_own_gold_loss(kind):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, 3, generator=g)
    labels = torch.tensor([0, 2, 1])
    right = torch.randn(B, 3, generator=g)
    right[torch.arange(B), labels] += 4.0          # a teacher that is mostly right …
    wrong = -right                                 # … and one that is mostly wrong
    tau = 2.0
    m = _method({"soft_loss": kind, "temperature": tau, "beta": 0, "soft_weight": 0.5, "hard_weight": 0.3})
    view = outputs({"attention_mask": torch.ones(B, 1), "labels": labels}, ModelView({}, z),
                   {"deep": ModelView({}, right), "shallow": ModelView({}, wrong)})
    terms = m.loss(step(), {}, 0, view)
    assert set(terms) == {"soft", "hard"}

    def per_example(t):
        p, log_p, log_q = torch.softmax(t / tau, -1), torch.log_softmax(t / tau, -1), torch.log_softmax(z / tau, -1)
        return -(p * log_q).sum(-1) if kind == "ce" else tau**2 * (p * (log_p - log_q)).sum(-1)

    def own_ce(t):
        return -torch.log_softmax(t, -1)[torch.arange(B), labels]

    by_teacher = {n: (per_example(t) / (1 + own_ce(t))).mean() for n, t in (("deep", right), ("shallow", wrong))}
    assert terms["soft"].item() == pytest.approx(0.5 * sum(by_teacher.values()).item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.3 * own_ce(z).mean().item(), rel=1e-5)
    per = m.soft_per_teacher(view)
    assert per["deep"].item() == pytest.approx(by_teacher["deep"].item(), rel=1e-5)
    # the wrong teacher's soft loss is scaled down far more than the right one's
    assert (own_ce(wrong) > 3 * own_ce(right)).all()


def test_token_logits_average_each_examples_real_tokens():
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    z, t1, t2 = (torch.randn(B, L, 7, generator=g) for _ in range(3))
    labels = torch.randint(0, 7, (B, L), generator=g).masked_fill(mask == 0, -100)
    m = _method({"beta": 0, "hard_weight": 0}, family="decoder", widths={"deep": HS, "shallow": HS})
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask, "labels": labels}, ModelView({}, z),
                                          {"deep": ModelView({}, t1), "shallow": ModelView({}, t2)}))
    expected = 0.0
    for t in (t1, t2):
        soft = -(torch.softmax(t, -1) * torch.log_softmax(z, -1)).sum(-1)                     # [B, L]
        ce = F.cross_entropy(t.transpose(1, 2), labels.clamp_min(0), reduction="none")          # [B, L]
        keep = mask.float()
        soft_b, ce_b = (soft * keep).sum(-1) / keep.sum(-1), (ce * keep).sum(-1) / keep.sum(-1)
        expected += (soft_b / (1 + ce_b)).mean().item()
    assert terms["soft"].item() == pytest.approx(expected, rel=1e-5)


def _patience_view(m, g, family="encoder"):
    sf = _hidden(2, HS, g)
    feats = {n: _hidden(DEPTHS[n], WIDTHS[n], g) for n in DEPTHS}
    z = torch.randn(B, 3, generator=g)
    batch = {"attention_mask": _mask(), "labels": torch.tensor([0, 1, 2])}
    view = outputs(batch, ModelView(sf, z), {n: ModelView(feats[n], torch.randn(B, 3, generator=g)) for n in DEPTHS})
    return sf, feats, view


def test_patience_term_goes_through_each_teachers_projection():
    g = torch.Generator().manual_seed(2)
    m = _method({"beta": 2.0, "soft_weight": 0, "hard_weight": 0})
    sf, feats, view = _patience_view(m, g)
    terms = m.loss(step(), {}, 0, view)
    assert set(terms) == {"patience"}
    keep = _mask().bool()
    expected = torch.zeros(())
    for name, pairs in {"deep": [(0, 2), (1, 5)], "shallow": [(0, 0), (1, 2)]}.items():
        w, b = m.proj[name].weight, m.proj[name].bias
        for s, t in pairs:
            diff = sf[f"layers.{s}.output"] - (feats[name][f"layers.{t}.output"] @ w.T + b)
            expected = expected + (diff**2)[keep].mean()
    assert terms["patience"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    # padding never counts: garbage in padded positions changes nothing
    sf["layers.0.output"][2, 1:] = 1e4
    assert m.loss(step(), {}, 0, view)["patience"].item() == pytest.approx(terms["patience"].item(), rel=1e-5)


def test_patience_projection_gradients_reach_every_teachers_projection_and_the_student():
    g = torch.Generator().manual_seed(3)
    m = _method({"soft_weight": 0, "hard_weight": 0})
    sf, feats, view = _patience_view(m, g)
    for v in sf.values():
        v.requires_grad_(True)
    m.loss(step(), {}, 0, view)["patience"].backward()
    for name in DEPTHS:
        assert m.proj[name].weight.grad is not None and m.proj[name].weight.grad.abs().sum() > 0
        assert all(t.grad is None for t in feats[name].values())
    assert sf["layers.0.output"].grad.abs().sum() > 0
    assert sf["embeddings"].grad is None   # not paired without use_embed


def test_student_side_projection_summary_token_and_normalisation_on_a_decoder():
    g = torch.Generator().manual_seed(4)
    m = _method({"project": "student", "only_cls": True, "normalized": True, "wo_final": True, "soft_weight": 0,
                 "hard_weight": 0}, family="decoder", student_layers=2)
    sf, feats, view = _patience_view(m, g, "decoder")
    terms = m.loss(step(), {}, 0, view)
    last = torch.tensor([4, 2, 0])                 # the last real token of each example (_mask)
    rows = torch.arange(B)
    expected = torch.zeros(())
    for name, t in (("deep", 2), ("shallow", 0)):  # wo_final: only pair (1, k)
        s = F.normalize(m.proj[name](sf["layers.0.output"][rows, last]), dim=-1)
        tt = F.normalize(feats[name][f"layers.{t}.output"][rows, last], dim=-1)
        expected = expected + ((s - tt) ** 2).mean()
    assert terms["patience"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_checks_name_the_teacher_the_field_and_the_fix():
    with pytest.raises(GkdError, match=r"teacher 'shallow' 3.*at least as deep"):
        _method(student_layers=4)
    _method({"beta": 0}, student_layers=4)          # no patience term: any depth
    with pytest.raises(GkdError, match=r"config.project: .*teacher 'deep' 12; set project: teacher or student"):
        _method({"project": "none"})
    _method({"project": "none"}, widths={"deep": HS, "shallow": HS})
    with pytest.raises(GkdError, match=r"config.wo_final: .*no intermediate layer"):
        build_method("mt-bert", {"wo_final": True}, student=shape(num_layers=1),
                     teachers={"a": shape(num_layers=2), "b": shape(num_layers=3)})
    no_head = {"a": shape(num_layers=4), "b": shape(num_layers=4, head="none")}
    with pytest.raises(GkdError, match=r"config.soft_weight: mt-bert: teacher 'b' has no task head"):
        build_method("mt-bert", student=shape(num_layers=2), teachers=no_head)
    build_method("mt-bert", {"soft_weight": 0}, student=shape(num_layers=2), teachers=no_head)
    with pytest.raises(GkdError, match="all 0"):
        _method({"soft_weight": 0, "beta": 0, "hard_weight": 0})


def test_soft_term_needs_labels_and_hard_loss_is_claimed():
    m = _method({"beta": 0})
    z = torch.randn(B, 3)
    with pytest.raises(GkdError, match="teacher 'deep' by its own loss on the gold labels, but the batch has no labels"):
        m.loss(step(), {}, 0, outputs({"attention_mask": torch.ones(B, 1)}, ModelView({}, z),
                                      {"deep": ModelView({}, z), "shallow": ModelView({}, z)}))
    assert SPEC.factory.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive({"hard_weight": 0}) == {}
    assert SPEC.has_parameters and SPEC.kind == "multi-teacher"


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", None),
    ("encoder", {"soft_loss": "kl", "temperature": 2.0, "use_embed": True}),
    ("decoder", None),
    ("decoder", {"project": "student", "only_cls": True, "normalized": True}),
])
def test_mt_bert_conformance_with_two_teachers_of_different_depth(family, config):
    report = check_conformance("mt-bert", config, family=family, teachers={"deep": 4, "shallow": 3})
    assert set(report.plans[0][0]) == {"student", "teacher:deep", "teacher:shallow"}
    assert set(report.terms[0]) == {"soft", "patience", "hard"}
    assert report.plans[0][0]["teacher:shallow"] >= {"layers.2.output"}   # (S, T) = (2, 3)


def _wide_and_narrow(family: str = "encoder") -> dict[str, torch.nn.Module]:
    """A 2-layer student (32 wide) and two teachers of different depth and width."""
    models = tiny_models(family, teachers={"wide": 4}, teacher_hidden_size=48)
    narrow = build_model(tiny_config(family, 3, hidden_size=24), seed=9).eval().requires_grad_(False)
    return models | {"teacher:narrow": narrow}


def test_teachers_of_different_width_through_the_engine():
    models = _wide_and_narrow()
    m = build_method("mt-bert", models=models, teachers=["wide", "narrow"], seed=0)
    assert (m.proj["wide"].in_features, m.proj["narrow"].in_features) == (48, 24)
    assert {p.out_features for p in m.proj.values()} == {32}
    result = run_step(m, models, tiny_batch("encoder", batch=3))
    assert set(result.terms) == {"mt-bert.soft", "mt-bert.patience", "mt-bert.hard"}
    result.loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in m.proj.values())
    assert all(p.grad is None for k, t in models.items() if k != "student" for p in t.parameters())


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_mt_bert_loss_decreases_with_teachers_of_different_size(family):
    models = _wide_and_narrow(family)
    with torch.no_grad():  # random tiny heads are near-uniform: sharpen the teachers so the soft term has work to do
        for key, teacher in models.items():
            if key != "student":
                (teacher.classifier.weight if family == "encoder" else teacher.final_norm.weight).mul_(
                    30.0 if family == "encoder" else 5.0)
    m = build_method("mt-bert", {"hard_weight": 0, "soft_loss": "kl"}, models=models, teachers=["wide", "narrow"],
                     seed=0)
    sel, batch = selected(m), tiny_batch(family, batch=4)
    opt = torch.optim.Adam([*models["student"].parameters(), *m.parameters()], lr=3e-3)
    history = []
    for i in range(15):
        result = run_step(sel, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append({"loss": result.loss.item()} | {k: v.item() for k, v in result.terms.items()})
    for key in ("loss", "mt-bert.soft", "mt-bert.patience"):
        assert history[-1][key] < 0.8 * history[0][key], (key, history[0][key], history[-1][key])
