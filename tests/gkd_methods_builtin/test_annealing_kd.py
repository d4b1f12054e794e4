from __future__ import annotations

import math
from fractions import Fraction

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
from gkd_methods_builtin.annealing_kd import SPEC
from gkd_methods_builtin.annealing_kd.method import AnnealingKD, annealing_factor, annealing_temperature

B, L, C, V = 3, 5, 4, 9


def _method(config=None, family="encoder", task=None):
    head = "lm" if family == "decoder" else None
    return build_method("annealing-kd", config, student=shape(family, num_layers=2, head=head, num_labels=C, vocab_size=V),
                        teachers={"t": shape(family, num_layers=4, head=head, num_labels=C, vocab_size=V)}, task=task)


def _reference_phi(iteration: int, total: int, tau: int) -> Fraction:
    """φ of the reference, t = (1 − iter/N)·τ_max, in exact arithmetic."""
    t = (1 - Fraction(iteration, total)) * tau
    return 1 - Fraction(max(1, math.ceil(t)) - 1, tau)


def test_phi_by_iteration_at_chosen_iterations():
    # τ_max 7 over 70 steps: T = 7 for steps 0-9 (t > 6), 6 from step 10 (t = 6 exactly), …, 1 from step 60
    expected = {0: (7, 1 / 7), 9: (7, 1 / 7), 10: (6, 2 / 7), 11: (6, 2 / 7), 35: (4, 4 / 7), 59: (2, 6 / 7),
                60: (1, 1.0), 69: (1, 1.0)}
    for it, (temp, phi) in expected.items():
        assert annealing_temperature(step(it, 70), 7) == temp, it
        assert annealing_factor(step(it, 70), 7) == pytest.approx(phi, abs=1e-12), it
    for total in (7, 13, 100, 101):  # every step, odd lengths: the reference's formula, without float rounding
        for it in range(total):
            assert annealing_factor(step(it, total), 7) == pytest.approx(float(_reference_phi(it, total, 7)), abs=1e-12)
    phis = [annealing_factor(step(it, 100), 10) for it in range(100)]
    assert phis == sorted(phis) and phis[0] == pytest.approx(0.1) and phis[-1] == 1.0


def test_phi_by_epoch_is_the_papers_schedule():
    temps = [annealing_temperature(step(0, 10, epoch=e), 7, "epoch") for e in range(10)]
    assert temps == [7, 6, 5, 4, 3, 2, 1, 1, 1, 1]
    assert [annealing_factor(step(0, 10, epoch=e), 7, "epoch") for e in (0, 3, 6, 9)] == pytest.approx(
        [1 / 7, 4 / 7, 1.0, 1.0])
    # Over a stage of exactly τ_max epochs the per-iteration schedule is the per-epoch one.
    per_epoch = 6
    for it in range(7 * per_epoch):
        st = step(it, 7 * per_epoch, epoch=it // per_epoch)
        assert annealing_temperature(st, 7) == annealing_temperature(st, 7, "epoch"), it


def test_loss_matches_formula_on_class_logits():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(B, C, generator=g), 3 * torch.randn(B, C, generator=g)
    batch = {"attention_mask": torch.ones(B, L, dtype=torch.long), "labels": torch.tensor([0, 3, 1])}
    m = _method({"max_temperature": 4, "hard_weight": 0.5})
    view = outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)})
    for it, phi in ((0, 0.25), (3, 0.5), (5, 0.75), (9, 1.0)):  # N = 10: t = 4, 2.8, 2, 0.4
        terms = m.loss(step(it, 10), {}, 0, view)
        assert set(terms) == {"annealing", "hard"}
        assert terms["annealing"].item() == pytest.approx(((z - phi * zt) ** 2).mean().item(), rel=1e-6)
        assert terms["hard"].item() == pytest.approx(0.5 * F.cross_entropy(z, batch["labels"]).item(), rel=1e-6)
    assert set(_method().loss(step(), {}, 0, view)) == {"annealing"}  # hard_weight 0 by default


def test_token_logits_average_over_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    z, zt = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    m = _method(family="decoder")
    st = step(3, 10)  # τ_max 7: t = 4.9, T = 5, φ = 3/7
    terms = m.loss(st, {}, 0, outputs({"attention_mask": mask}, ModelView({}, z), {"t": ModelView({}, zt)}))
    keep = mask.bool()
    expected = ((z - 3 / 7 * zt) ** 2)[keep].mean()
    assert terms["annealing"].item() == pytest.approx(expected.item(), rel=1e-6)
    z2, zt2 = z.clone(), zt.clone()
    z2[~keep], zt2[~keep] = 1e4, -1e4  # padding must not matter
    again = m.loss(st, {}, 0, outputs({"attention_mask": mask}, ModelView({}, z2), {"t": ModelView({}, zt2)}))
    assert again["annealing"].item() == pytest.approx(terms["annealing"].item(), rel=1e-6)


def test_plan_asks_for_logits_only():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:t"}
    assert all(not r.features and not r.operations for r in plan.models.values())
    assert m.plan(step(), {}, 1, None) is None
    assert m.initial_state() == {}


def test_shape_rules_and_hard_claim():
    ctx = MethodContext(shape(), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.model == "teacher 't'" and "annealing-kd: teacher 't' has no task head" in issue.message
    ctx = MethodContext(shape(num_labels=3), {"t": shape(num_labels=5)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert "student has 3 classes and teacher 't' 5" in issue.message
    with pytest.raises(GkdError, match="has no task head"):
        build_method("annealing-kd", {}, teachers={"t": shape(head="none")}, check=False)
    with pytest.raises(GkdError, match=r"config\.anneal_by: 'step' is not one of"):
        build_method("annealing-kd", {"anneal_by": "step"})
    assert AnnealingKD.exclusive({"hard_weight": 0.0}) == {}
    assert AnnealingKD.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, {}),
    ("encoder", None, {"anneal_by": "epoch", "hard_weight": 0.5}),
    ("encoder", "masked_lm", {"max_temperature": 3}),
    ("decoder", None, {}),
])
def test_conformance(family, task, config):
    report = check_conformance("annealing-kd", config, family=family, task=task)
    assert set(report.terms[0]) == ({"annealing", "hard"} if config.get("hard_weight") else {"annealing"})
    assert report.states == [{}, {}]


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_loss_decreases_on_tiny_models(family):
    models = tiny_models(family)
    method = build_method("annealing-kd", models=models)
    batch = tiny_batch(family)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        opt.zero_grad()
        result = run_step(method, models, batch, iteration=40, total=50)  # φ = 1 - 1/7
        result.loss.backward()
        opt.step()
        history.append(float(result.terms["annealing-kd.annealing"].detach()))
    assert history[-1] < 0.5 * history[0], history
