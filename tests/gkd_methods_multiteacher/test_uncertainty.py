from __future__ import annotations

import math

import pytest
import torch

from gkd.methods import GkdError, ModelView, PassView
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
from gkd_methods_multiteacher.uncertainty import SPEC
from gkd_methods_multiteacher.uncertainty.method import hard_groups, normalized_entropy, soft_weights

TEACHERS = {"small": shape(num_layers=3), "mid": shape(num_layers=4), "large": shape(num_layers=6)}


def _method(config=None, teachers=("small", "large")):
    return build_method("uncertainty", config, student=shape(num_layers=2), teachers={t: TEACHERS[t] for t in teachers})


def _kl(z: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(z/τ)) per position, by hand."""
    p, log_p, log_q = torch.softmax(t / tau, -1), torch.log_softmax(t / tau, -1), torch.log_softmax(z / tau, -1)
    return tau**2 * (p * (log_p - log_q)).sum(-1)


def _student_logits() -> torch.Tensor:
    """Five examples whose uncertainty falls with the scale of their logits: most uncertain first
    are examples 1, 4, 2, 3, 0."""
    scale = torch.tensor([3.0, 0.0, 1.0, 2.0, 0.5])
    return scale[:, None] * torch.tensor([2.0, 0.0, -1.0])


def _two_passes(m, batch, student: torch.Tensor, teachers: dict[str, torch.Tensor]):
    """Pass 0 (student) and pass 1 (the planned teachers) of one step, as the engine runs them."""
    first = m.plan(step(), {}, 0, None)
    assert set(first.models) == {"student"}
    view0 = outputs(batch, ModelView({}, student))
    terms0 = m.loss(step(), {}, 0, view0)
    second = m.plan(step(), {}, 1, view0)
    planned = [k.split(":", 1)[1] for k in second.models]
    view1 = PassView(batch, {k: ModelView({}, teachers[k.split(":", 1)[1]]) for k in second.models})
    terms1 = m.loss(step(), {}, 1, view1)
    assert m.plan(step(), {}, 2, view1) is None
    return planned, terms0, terms1


def test_normalized_entropy_is_one_for_uniform_and_ignores_padding():
    u = normalized_entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]]))
    assert u[0].item() == pytest.approx(1.0) and u[1].item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    per_tok = -(torch.softmax(tokens, -1) * torch.log_softmax(tokens, -1)).sum(-1) / math.log(5)
    u = normalized_entropy(tokens, mask)
    assert u[0].item() == pytest.approx(per_tok[0, :2].mean().item(), rel=1e-6)
    assert u[1].item() == pytest.approx(per_tok[1].mean().item(), rel=1e-6)
    assert not u.requires_grad                              # detached
    garbage = tokens.detach().clone()
    garbage[0, 2:] = torch.tensor([30.0, 0, 0, 0, 0])
    assert normalized_entropy(garbage, mask)[0].item() == pytest.approx(u[0].item(), rel=1e-6)


def test_hard_groups_are_equal_rank_quantiles_most_uncertain_first():
    u = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    assert hard_groups(u, 2).tolist() == [1, 0, 1, 1, 0]       # the ⌊5/2⌋ most uncertain to group 0
    assert hard_groups(u, 3).tolist() == [2, 0, 1, 2, 1]       # sizes 1, 2, 2
    assert hard_groups(torch.full((4,), 0.5), 2).tolist() == [0, 0, 1, 1]   # ties keep batch order
    assert hard_groups(torch.tensor([0.2, 0.8]), 3).tolist() == [2, 1]       # B < n: group 0 stays empty


def test_hard_assignment_routes_a_fixed_batch_and_matches_the_formula():
    z = _student_logits()
    assert normalized_entropy(z).argsort(descending=True).tolist() == [1, 4, 2, 3, 0]
    g = torch.Generator().manual_seed(1)
    t = {"small": torch.randn(5, 3, generator=g), "large": torch.randn(5, 3, generator=g)}
    labels = torch.tensor([0, 1, 2, 0, 1])
    m = _method({"hard_weight": 0.5, "soft_weight": 2.0})
    planned, terms0, terms1 = _two_passes(m, {"labels": labels}, z, t)
    assert planned == ["small", "large"]
    assert terms0["hard"].item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(z, labels).item(), rel=1e-6)
    # examples 1 and 4 (most uncertain) learn from the first teacher, 2, 3 and 0 from the second
    own = torch.stack([_kl(z[b], t["small" if b in (1, 4) else "large"][b]) for b in range(5)])
    assert set(terms1) == {"soft"}
    assert terms1["soft"].item() == pytest.approx(2.0 * own.mean().item(), rel=1e-5)
    # teacher_order reverses the routing
    rev = _method({"teacher_order": ["large", "small"]})
    _, _, terms_rev = _two_passes(rev, {"labels": labels}, z, t)
    own_rev = torch.stack([_kl(z[b], t["large" if b in (1, 4) else "small"][b]) for b in range(5)])
    assert terms_rev["soft"].item() == pytest.approx(own_rev.mean().item(), rel=1e-5)


def test_soft_weights_sum_to_n_and_match_the_formula():
    u = torch.tensor([0.2, 0.9])
    w2 = soft_weights(u, 2)
    assert torch.allclose(w2, torch.tensor([[0.4, 1.6], [1.8, 0.2]]))
    w3 = soft_weights(u, 3)
    assert torch.allclose(w3.sum(-1), torch.full((2,), 3.0))
    assert torch.allclose(w3[0], torch.tensor([0.2, 0.5, 0.8]) * 3 / 1.5)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, generator=g)
    t = {n: torch.randn(4, 3, generator=g) for n in ("small", "mid", "large")}
    m = _method({"assign": "soft", "hard_weight": 0, "temperature": 2.0}, teachers=("small", "mid", "large"))
    planned, terms0, terms1 = _two_passes(m, {}, z, t)
    assert planned == ["small", "mid", "large"] and terms0 == {}
    w = soft_weights(normalized_entropy(z), 3)
    expected = sum((w[:, j] * _kl(z, t[n], 2.0)).mean() for j, n in enumerate(("small", "mid", "large"))) / 3
    assert terms1["soft"].item() == pytest.approx(expected.item(), rel=1e-5)
    # two teachers: u_b for the first, 1 − u_b for the second (after the mean over teachers)
    two = _method({"assign": "soft", "hard_weight": 0})
    _, _, terms2 = _two_passes(two, {}, z, t)
    u = normalized_entropy(z)
    expected2 = (u * _kl(z, t["small"]) + (1 - u) * _kl(z, t["large"])).mean()
    assert terms2["soft"].item() == pytest.approx(expected2.item(), rel=1e-5)


def test_token_logits_route_by_the_mean_entropy_of_real_tokens():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 6, generator=g)
    z[0] *= 5                                      # example 0 confident, example 1 uncertain
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t = {"small": torch.randn(2, 4, 6, generator=g), "large": torch.randn(2, 4, 6, generator=g)}
    m = _method({"hard_weight": 0})
    _, _, terms = _two_passes(m, {"attention_mask": mask}, z, t)
    keep = mask.float()
    per = {n: (_kl(z, t[n]) * keep).sum(-1) / keep.sum(-1) for n in t}
    assert terms["soft"].item() == pytest.approx(((per["small"][1] + per["large"][0]) / 2).item(), rel=1e-5)


def test_a_micro_batch_smaller_than_the_teacher_count_is_an_error_or_routed():
    z = torch.randn(1, 3)
    m = _method({"small_batch": "error"})
    m.plan(step(), {}, 0, None)
    with pytest.raises(GkdError, match=r"micro-batch has 1 example\(s\) and there are 2 teachers.*small_batch: route"):
        m.plan(step(), {}, 1, outputs({}, ModelView({}, z)))
    routed = _method({"hard_weight": 0})  # route is the default
    planned, _, terms = _two_passes(routed, {}, z, {"small": torch.randn(1, 3), "large": torch.randn(1, 3)})
    assert planned == ["large"]                    # rank 0 of 1 is the top quantile's last group
    assert torch.isfinite(terms["soft"])
    soft = _method({"assign": "soft"})             # the soft variant has no minimum
    soft.plan(step(), {}, 0, None)
    assert len(soft.plan(step(), {}, 1, outputs({}, ModelView({}, z))).models) == 2


def _counting(models):
    counts = dict.fromkeys(models, 0)
    for key, model in models.items():
        model.register_forward_pre_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
    return counts


def test_teachers_without_examples_are_not_run_and_the_student_runs_once():
    models = tiny_models("encoder", teachers={"a": 4, "b": 3, "c": 3})
    counts = _counting(models)
    m = build_method("uncertainty", {"small_batch": "route"}, models=models)
    result = run_step(m, models, tiny_batch("encoder", batch=2))
    # B = 2 < n = 3: the two examples go to groups 1 and 2; teacher 'a' gets none
    assert counts == {"student": 1, "teacher:a": 0, "teacher:b": 1, "teacher:c": 1}
    assert set(result.terms) == {"uncertainty.hard", "uncertainty.pass1.soft"}
    result.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models["student"].parameters())
    counts.update(dict.fromkeys(counts, 0))
    run_step(m, models, tiny_batch("encoder", batch=6))
    assert counts == {"student": 1, "teacher:a": 1, "teacher:b": 1, "teacher:c": 1}
    one_pass = build_method("uncertainty", {"small_batch": "route", "skip_idle_teachers": False}, models=models)
    counts.update(dict.fromkeys(counts, 0))
    single = run_step(one_pass, models, tiny_batch("encoder", batch=2))
    assert counts == {"student": 1, "teacher:a": 1, "teacher:b": 1, "teacher:c": 1}
    assert single.terms["uncertainty.soft"].item() == pytest.approx(result.terms["uncertainty.pass1.soft"].item(),
                                                                    rel=1e-5)


def test_small_batches_through_the_engine_are_routed_or_an_error_naming_both_sizes():
    models = tiny_models("encoder", teachers={"a": 4, "b": 3, "c": 3})
    result = run_step(build_method("uncertainty", models=models), models, tiny_batch("encoder", batch=2))
    assert torch.isfinite(result.loss) and "uncertainty.pass1.soft" in result.terms  # default: routed
    with pytest.raises(GkdError, match=r"has 2 example.*there are 3 teachers"):
        run_step(build_method("uncertainty", {"small_batch": "error"}, models=models), models,
                 tiny_batch("encoder", batch=2))


def test_checks_and_claims():
    with pytest.raises(GkdError, match=r"config.teacher_order: uncertainty: teacher_order must list the entry's "
                                       r"teachers \['small', 'large'\] each once"):
        _method({"teacher_order": ["small", "mid"]})
    with pytest.raises(GkdError, match=r"config.soft_weight: .*both 0"):
        _method({"soft_weight": 0, "hard_weight": 0})
    with pytest.raises(GkdError, match="teacher 'b' has no task head"):
        build_method("uncertainty", student=shape(num_layers=2), teachers={"a": shape(), "b": shape(head="none")})
    hard_only = _method({"soft_weight": 0})
    assert set(hard_only.plan(step(), {}, 0, None).models) == {"student"}
    assert hard_only.plan(step(), {}, 1, outputs({}, ModelView({}, torch.randn(2, 3)))) is None
    assert SPEC.factory.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}
    assert not SPEC.has_parameters and SPEC.kind == "multi-teacher"


@pytest.mark.parametrize(("family", "config", "terms"), [
    ("encoder", None, {"hard", "pass1.soft"}),
    ("encoder", {"assign": "soft", "soft_loss": "ce", "temperature": 2.0}, {"hard", "pass1.soft"}),
    ("encoder", {"skip_idle_teachers": False}, {"hard", "soft"}),
    ("decoder", None, {"hard", "pass1.soft"}),
    ("decoder", {"assign": "soft", "teacher_order": ["shallow", "deep"]}, {"hard", "pass1.soft"}),
])
def test_uncertainty_conformance_with_two_teachers_of_different_depth(family, config, terms):
    report = check_conformance("uncertainty", config, family=family, teachers={"deep": 4, "shallow": 3})
    assert set(report.terms[0]) == terms
    teachers = {"teacher:deep", "teacher:shallow"}
    if terms == {"hard", "soft"}:
        assert [set(p) for p in report.plans[0]] == [{"student"} | teachers]
    else:
        assert [set(p) for p in report.plans[0]] == [{"student"}, teachers]


@pytest.mark.parametrize("assign", ["hard", "soft"])
def test_uncertainty_loss_decreases_with_teachers_of_different_size(assign):
    models = tiny_models("encoder", teachers={"small": 3, "large": 6})
    # A confident large teacher and a near-uniform small one (random tiny heads are near-uniform): examples the
    # student is unsure of go to the small teacher and stay unsure, confident ones learn from the large teacher
    # and grow more confident, so the hard routing settles instead of moving examples back and forth.
    with torch.no_grad():
        models["teacher:large"].classifier.weight.mul_(30.0)
    m = build_method("uncertainty", {"assign": assign, "hard_weight": 0}, models=models)
    sel, batch = selected(m), tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam(models["student"].parameters(), lr=1e-3)
    history = []
    for i in range(15):
        result = run_step(sel, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append(result.terms["uncertainty.pass1.soft"].item())
    assert history[-1] < 0.3 * history[0], history
