"""DGKD: every earlier teacher and assistant guides the student; each is dropped at random per
step, dropped teachers are not run; loss = λ·Σ_survivors τ²·KL + (1−λ)·hard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.engine.step import method_generator, step_context
from gkd.methods import GkdError, ModelView
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

NAMES = ("large", "ta1", "ta2")
TEACHERS = {"large": shape(num_layers=6), "ta1": shape(num_layers=4), "ta2": shape(num_layers=3)}


def _kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    p = F.softmax(teacher / tau, dim=-1)
    return (p * (torch.log(p) - F.log_softmax(student / tau, dim=-1))).sum(-1).mean()


def _logits(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g), {n: torch.randn(4, 3, generator=g) for n in NAMES}, torch.tensor([0, 2, 1, 2])


def _seed_where(survival: float, wanted: list[bool]) -> int:
    """A step seed whose draw of three independent survivals is ``wanted``."""
    for seed in range(10_000):
        if (torch.rand(3, generator=torch.Generator().manual_seed(seed)) < survival).tolist() == wanted:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_teachers_survive_at_survival_1_and_the_terms_match_the_formula(reduction):
    z, teachers, labels = _logits()
    m = build_method("dgkd", {"survival": 1.0, "reduction": reduction}, teachers=TEACHERS)
    assert set(m.plan(step(), {}, 0, None).models) == {"student", "teacher:large", "teacher:ta1", "teacher:ta2"}
    terms = m.loss(step(), {}, 0, outputs({"labels": labels}, ModelView({}, z),
                                          {n: ModelView({}, t) for n, t in teachers.items()}))
    per = torch.stack([100 * _kl(z, teachers[n], 10.0) for n in NAMES])
    expected = per.sum() if reduction == "sum" else per.mean()
    assert terms["soft"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.5 * F.cross_entropy(z, labels).item(), rel=1e-6)


def test_survivors_of_a_fixed_seed_are_planned_and_summed_the_others_are_not():
    seed = _seed_where(0.75, [True, False, True])
    m = build_method("dgkd", teachers=TEACHERS)  # survival 0.75
    plan = m.plan(step(seed=seed), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:large", "teacher:ta2"}  # ta1 dropped: not run
    assert m.survivors(step(seed=seed)) == ["large", "ta2"]
    z, teachers, labels = _logits(1)
    view = outputs({"labels": labels}, ModelView({}, z), {n: ModelView({}, teachers[n]) for n in ("large", "ta2")})
    terms = m.loss(step(seed=seed), {}, 0, view)
    expected = 100 * (_kl(z, teachers["large"], 10.0) + _kl(z, teachers["ta2"], 10.0))
    assert terms["soft"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_when_no_teacher_survives_only_the_hard_term_trains():
    seed = _seed_where(0.3, [False, False, False])
    m = build_method("dgkd", {"survival": 0.3}, teachers=TEACHERS)
    assert set(m.plan(step(seed=seed), {}, 0, None).models) == {"student"}
    z, _, labels = _logits(2)
    z.requires_grad_(True)
    terms = m.loss(step(seed=seed), {}, 0, outputs({"labels": labels}, ModelView({}, z)))
    assert terms["soft"].item() == 0.0
    assert terms["hard"].item() == pytest.approx(0.5 * F.cross_entropy(z, labels).item(), rel=1e-6)
    sum(terms.values()).backward()
    expected = torch.autograd.grad(0.5 * F.cross_entropy(z, labels), z)[0]
    assert torch.allclose(z.grad, expected)


def test_drop_count_drops_exactly_that_many_uniformly():
    m = build_method("dgkd", {"drop": "count", "drop_count": 2}, teachers=TEACHERS)
    seen = set()
    for seed in range(40):
        survivors = m.survivors(step(seed=seed))
        assert len(survivors) == 1
        seen.add(survivors[0])
        order = torch.randperm(3, generator=torch.Generator().manual_seed(seed))
        assert survivors == [NAMES[int(order[2])]]
    assert seen == set(NAMES)
    with pytest.raises(GkdError, match="dgkd: drop_count 3 drops every one of the 3 teachers in every step; use at most 2"):
        build_method("dgkd", {"drop": "count", "drop_count": 3}, teachers=TEACHERS)


def test_only_surviving_teachers_are_run_through_the_engine():
    models = tiny_models("encoder", teachers={"large": 4, "ta1": 3, "ta2": 2}, student_layers=1)
    runs = dict.fromkeys(NAMES, 0)
    for name in NAMES:
        models[f"teacher:{name}"].register_forward_hook(lambda *_, name=name: runs.__setitem__(name, runs[name] + 1))
    m = build_method("dgkd", {"survival": 0.5}, models=models)
    sel, batch = selected(m), tiny_batch("encoder", batch=4)
    expected = dict.fromkeys(NAMES, 0)
    for i in range(8):
        result = run_step(sel, models, batch, iteration=i, total=8)
        keep = torch.rand(3, generator=method_generator(0, "test", i, "dgkd")) < 0.5
        for name, kept in zip(NAMES, keep.tolist(), strict=True):
            expected[name] += kept
        assert set(result.terms) == {"dgkd.soft", "dgkd.hard"}
    assert runs == expected
    assert all(0 < n < 8 for n in runs.values()), runs  # each teacher skipped in some step, run in another


def test_validation_rules():
    with pytest.raises(GkdError, match="dgkd: teacher 'ta1' has no task head"):
        build_method("dgkd", teachers={"large": shape(), "ta1": shape(head="none")})
    from gkd.plugins import load_plugin_manager

    spec = load_plugin_manager().registry.get("dgkd").spec
    assert spec.kind == "multi-teacher" and "ICCV 2021" in spec.citation
    assert type(build_method("dgkd", teachers=TEACHERS)).exclusive({"hard_weight": 0.5}) == {"hard_loss": "hard_weight"}


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_dgkd_conformance_with_teachers_of_different_depth(family):
    report = check_conformance("dgkd", {"survival": 0.75}, family=family, teachers={"large": 4, "ta": 3}, steps=3)
    for plans in report.plans:
        assert "student" in plans[0] and set(plans[0]) <= {"student", "teacher:large", "teacher:ta"}


def test_dgkd_loss_decreases_with_teachers_of_different_size():
    models = tiny_models("encoder", teachers={"large": 4, "ta": 3}, student_layers=1)
    m = build_method("dgkd", {"survival": 0.75, "temperature": 2.0, "hard_weight": 0.0}, models=models)
    sel, batch = selected(m), tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)

    def loss_at(iteration: int) -> float:  # the same iteration draws the same survivors
        with torch.no_grad():
            return run_step(sel, models, batch, iteration=iteration, total=15).loss.item()

    probe = [i for i in range(15) if m.survivors(step_context(0, "test", 0, 0, i, 15, "dgkd"))][:3]
    before = [loss_at(i) for i in probe]
    for i in range(15):
        result = run_step(sel, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    after = [loss_at(i) for i in probe]
    assert all(a < 0.7 * b for a, b in zip(after, before, strict=True)), (before, after)
