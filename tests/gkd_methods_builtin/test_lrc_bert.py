from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import GkdError, MethodContext, ModelView, PassView, check_features
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
from gkd_methods_builtin.lrc_bert import SPEC
from gkd_methods_builtin.lrc_bert.method import cos_nce

S, T, HS, HT, B, L = 2, 4, 8, 12, 4, 6


def _method(**config):
    return build_method("lrc-bert", config, student=shape(num_layers=S, hidden_size=HS),
                        teachers={"t": shape(num_layers=T, hidden_size=HT)}, seed=0)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    mask[3, 5:] = 0
    return mask


def _features(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    s = {f"layers.{i}.output": torch.randn(B, L, HS, generator=gen) for i in range(S)}
    t = {f"layers.{i}.output": torch.randn(B, L, HT, generator=gen) for i in range(T)}
    return s, t


def _expected(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """COS-NCE by hand: g_ij over layers and the positions real in both i and j, then
    l_i = 1 − Σ_{j≠i} g_ij / (2(b−1)) + g_ii, returned per example."""
    b = mask.shape[0]
    g = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            cos = [F.cosine_similarity(s[i, p], t[j, p], dim=0) for s, t in zip(student, teacher, strict=True)
                   for p in range(mask.shape[1]) if mask[i, p] and mask[j, p]]
            g[i, j] = 1 - torch.stack(cos).mean()
    return torch.stack([1 - sum(g[i, j] for j in range(b) if j != i) / (2 * (b - 1)) + g[i, i] for i in range(b)])


def test_cos_nce_matches_the_formula_with_padding():
    g = torch.Generator().manual_seed(0)
    mask = _mask()
    s, t = torch.randn(B, S, L, HT, generator=g), torch.randn(B, S, L, HT, generator=g)
    got = cos_nce(s, t, mask)
    want = _expected(list(s.unbind(1)), list(t.unbind(1)), mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Candidates from other ranks: the positives are the own rows wherever they sit among them.
    extra_t, extra_mask = torch.randn(3, S, L + 2, HT, generator=g), torch.ones(3, L + 2, dtype=torch.long)
    extra_mask[0, 3:] = 0
    t_all = torch.cat([extra_t[:1], F.pad(t, (0, 0, 0, 2)), extra_t[1:]])
    m_all = torch.cat([extra_mask[:1], F.pad(mask, (0, 2)), extra_mask[1:]])
    got_all = cos_nce(s, t, mask, t_all, m_all)
    n = B + 3
    for i in range(B):
        gij = []
        for j in range(n):
            keep = [p for p in range(L) if mask[i, p] and m_all[j, p]]
            cos = torch.stack([F.cosine_similarity(s[i, layer, p], t_all[j, layer, p], dim=0)
                               for layer in range(S) for p in keep])
            gij.append(1 - cos.mean())
        own = 1 + i  # t sits after the first extra row
        neg = sum(gij[j] for j in range(n) if j != own)
        assert got_all[i].item() == pytest.approx((1 - neg / (2 * (n - 1)) + gij[own]).item(), rel=1e-5)


def test_contrastive_term_through_the_projection_and_padding_does_not_count():
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    sf, tf = _features(g)
    m = _method(perturb=False, alpha=0.5)
    view = outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)})
    terms = m.loss(step(), {}, 0, view)
    assert set(terms) == {"contrastive"}
    W = m.proj.weight
    assert m.proj.bias is None
    student = [sf["layers.0.output"] @ W.T, sf["layers.1.output"] @ W.T]
    teacher = [tf["layers.1.output"], tf["layers.3.output"]]  # uniform_map(4, 2) = [0, 2, 4]
    want = 0.5 * S * _expected(student, teacher, mask).mean()
    assert terms["contrastive"].item() == pytest.approx(want.item(), rel=1e-5)
    with torch.no_grad():  # the reference's l_i = 1 − (Σ_j g_ij − b·g_ii)/(2(b−1)) + g_ii: another value
        gmat = torch.zeros(B, B)
        for i in range(B):
            for j in range(B):
                keep = [p for p in range(L) if mask[i, p] and mask[j, p]]
                gmat[i, j] = 1 - torch.stack([F.cosine_similarity(s[i, p], t[j, p], dim=0)
                                              for s, t in zip(student, teacher, strict=True) for p in keep]).mean()
        diag_b_times = 0.5 * S * (1 - (gmat.sum(1) - B * gmat.diag()) / (2 * (B - 1)) + gmat.diag()).mean()
    assert abs(terms["contrastive"].item() - diag_b_times.item()) > 1e-3
    terms["contrastive"].backward()
    assert m.proj.weight.grad is not None and bool(m.proj.weight.grad.abs().sum() > 0)
    scribbled = {k: torch.where(mask.bool()[..., None], v, 1e3 * torch.randn(v.shape, generator=g)) for k, v in sf.items()}
    t_scribbled = {k: torch.where(mask.bool()[..., None], v, 1e3 * torch.randn(v.shape, generator=g)) for k, v in tf.items()}
    again = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(scribbled, None),
                                          {"t": ModelView(t_scribbled, None)}))
    assert again["contrastive"].item() == pytest.approx(terms["contrastive"].item(), rel=1e-6)


def test_plan_two_passes_with_perturbation():
    m = _method(soft_weight=1.0)
    plan0 = m.plan(step(), {}, 0, None)
    assert plan0.contributes_to_loss is False
    assert plan0.models["student"].features == {"embeddings", "layers.0.output", "layers.1.output"}
    assert plan0.models["teacher:t"].features == {"layers.1.output", "layers.3.output"}
    assert not plan0.models["student"].operations
    emb = torch.randn(B, L, HS, requires_grad=True)
    probe = PassView({"attention_mask": _mask()}, {}, terms={"x": (emb**2).sum()})
    probe.models = {"student": ModelView({"embeddings": emb}, None)}
    plan1 = m.plan(step(), {}, 1, probe)
    assert plan1.contributes_to_loss is True
    assert set(plan1.models) == {"student"}  # the teacher is not run again
    assert plan1.models["student"].features == {"layers.0.output", "layers.1.output"}
    assert set(plan1.models["student"].operations) == {"embeddings"}
    x = torch.zeros(B, L, HS)
    delta = plan1.models["student"].operations["embeddings"](x)
    torch.testing.assert_close(delta, 2 * emb.detach() / (2 * emb.detach()).norm())  # g = 2e, ε = 1
    assert m.plan(step(), {}, 2, None) is None
    plain = _method(perturb=False)
    only = plain.plan(step(), {}, 0, None)
    assert only.contributes_to_loss is True and only.models["student"].features == {"layers.0.output", "layers.1.output"}
    assert plain.plan(step(), {}, 1, None) is None
    hard_only = _method(alpha=0, hard_weight=1.0, perturb=False)
    assert set(hard_only.plan(step(), {}, 0, None).models) == {"student"}


def test_perturbation_scaling_and_non_finite_gradients():
    emb = torch.randn(B, L, HS, requires_grad=True)
    weights = torch.arange(1.0, B + 1)[:, None, None]
    probe = PassView({}, {"student": ModelView({"embeddings": emb}, None)}, terms={"x": (weights * emb**2).sum()})
    g = 2 * weights * emb.detach()
    torch.testing.assert_close(_method(epsilon=0.3).perturbation(probe), 0.3 * g / g.norm())
    per_example = _method(perturb_norm="example", epsilon=0.5).perturbation(probe)
    torch.testing.assert_close(per_example, 0.5 * g / g.flatten(1).norm(dim=1)[:, None, None])
    torch.testing.assert_close(per_example.flatten(1).norm(dim=1), torch.full((B,), 0.5))
    bad = PassView({}, {"student": ModelView({"embeddings": emb}, None)},
                   terms={"x": (emb * torch.tensor(float("nan"))).sum()})
    assert torch.equal(_method().perturbation(bad), torch.zeros_like(emb))


def _record(method):
    """Wrap plan (pass 1 also records the perturbed embeddings) and loss (keep every view)."""
    views, plan, loss = [], method.plan, method.loss

    def recording_plan(step, state, pass_index, previous):
        p = plan(step, state, pass_index, previous)
        if pass_index == 1 and p is not None:
            req = p.models["student"]
            p.models["student"] = type(req)(features=req.features | {"embeddings"}, operations=req.operations)
        return p

    def recording_loss(step, state, pass_index, outputs):
        views.append(outputs)
        return loss(step, state, pass_index, outputs)

    method.plan, method.loss = recording_plan, recording_loss
    return views


@pytest.mark.parametrize("norm", ["tensor", "example"])
def test_perturbed_pass_adds_exactly_epsilon_times_the_normalised_gradient(norm):
    models = tiny_models("encoder")
    m = build_method("lrc-bert", {"epsilon": 0.7, "perturb_norm": norm, "soft_weight": 1.0, "hard_weight": 3.0},
                     models=models, seed=0)
    views = _record(m)
    result = run_step(m, models, tiny_batch("encoder", batch=3))
    probe, perturbed = views
    e0, e1 = probe.student.features["embeddings"], perturbed.student.features["embeddings"]
    (g,) = torch.autograd.grad(sum(probe.terms.values()), e0, retain_graph=True)
    norm_g = g.norm() if norm == "tensor" else g.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(e1 - e0, 0.7 * g / norm_g, rtol=1e-4, atol=1e-6)
    assert not torch.equal(perturbed.student.features["layers.1.output"], probe.student.features["layers.1.output"])
    # Only pass 1 is optimised; pass 0 is logged.
    assert set(result.terms) == {"lrc-bert.contrastive", "lrc-bert.soft", "lrc-bert.hard", "lrc-bert.pass1.contrastive",
                                 "lrc-bert.pass1.soft", "lrc-bert.pass1.hard"}
    optimised = sum(v for k, v in result.terms.items() if ".pass1." in k)
    assert result.loss.item() == pytest.approx(optimised.item(), rel=1e-6)
    # Pass 1's soft term is against the teacher's pass-0 logits and the perturbed student's logits.
    zt = probe.teacher("t").logits
    want = F.kl_div(F.log_softmax(perturbed.student.logits / 1.1, -1), F.log_softmax(zt / 1.1, -1), log_target=True,
                    reduction="batchmean") * 1.1**2
    assert result.terms["lrc-bert.pass1.soft"].item() == pytest.approx(want.item(), rel=1e-5)


def test_the_teacher_runs_once_per_step_and_accumulated_gradients_are_untouched():
    models = tiny_models("encoder")
    m = build_method("lrc-bert", {"soft_weight": 1.0, "hard_weight": 1.0}, models=models, seed=0)
    batch = tiny_batch("encoder")
    params = [*models["student"].parameters(), *m.parameters()]
    result = run_step(m, models, batch)
    result.loss.backward()
    fresh = [p.grad.clone() for p in params]
    for p in params:  # a previous micro-batch's gradients
        p.grad = torch.ones_like(p)
    calls = []
    hooks = [mod.register_forward_hook(lambda *_, key=key: calls.append(key)) for key, mod in models.items()]
    try:
        result = run_step(m, models, batch)  # the probe's autograd.grad runs in here
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["student", "teacher:t", "student"]
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    result.loss.backward()
    for p, f in zip(params, fresh, strict=True):
        torch.testing.assert_close(p.grad, 1 + f)


def test_combined_with_kd_the_shared_forward_graph_survives_the_probe():
    """KD's pass-0 loss backpropagates through the same student forward the probe differentiated."""
    models = tiny_models("encoder")
    lrc = build_method("lrc-bert", models=models, seed=0)
    kd = build_method("kd", {"hard_weight": 0}, models=models)
    result = run_step({"lrc-bert": lrc, "kd": kd}, models, tiny_batch("encoder"))
    assert {"kd.soft", "lrc-bert.contrastive", "lrc-bert.pass1.contrastive"} == set(result.terms)
    result.loss.backward()
    assert lrc.proj.weight.grad is not None


def test_checks_name_the_field_and_the_models():
    ctx = MethodContext(shape(num_layers=3), {"t": shape(num_layers=2)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.model == "teacher 't'" and issue.field is None
    assert issue.message.startswith("lrc-bert: maps every student layer onto a teacher layer, but the student has 3")
    assert check_features(SPEC, {"alpha": 0, "hard_weight": 1}, ctx) == []
    ok = MethodContext(shape(num_layers=2), {"t": shape()}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {"alpha": 0}, ok)
    assert issue.field == "alpha" and "nothing is optimised" in issue.message
    headless = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {"soft_weight": 1.0}, headless)
    assert issue.field == "soft_weight"
    assert check_features(SPEC, {}, headless) == []  # stage 1 needs no teacher logits
    with pytest.raises(GkdError, match="use a teacher at least as deep"):
        build_method("lrc-bert", {}, student=shape(num_layers=5), teachers={"t": shape(num_layers=4)}, check=False)
    assert SPEC.factory.exclusive({"hard_weight": 3.0}) == {"hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive({"hard_weight": 0}) == {}


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("config", [{}, {"perturb": False, "gather_dp": False},
                                    {"soft_weight": 1.0, "temperature": 1.1, "hard_weight": 3.0,
                                     "perturb_norm": "example", "epsilon": 0.5}])
def test_lrc_bert_conformance(family, config):
    report = check_conformance("lrc-bert", config, family=family)
    assert len(report.plans[0]) == (2 if config.get("perturb", True) else 1)


def test_terms_decrease_on_tiny_models():
    models = tiny_models("encoder", student_hidden_size=16)
    m = build_method("lrc-bert", models=models, seed=0)
    batch = tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam([*models["student"].parameters(), *m.parameters()], lr=3e-3)
    values = []
    for _ in range(15):
        opt.zero_grad()
        result = run_step(m, models, batch)
        result.loss.backward()
        opt.step()
        values.append(float(result.terms["lrc-bert.pass1.contrastive"].detach()))
    assert values[-1] < values[0] - 0.5
