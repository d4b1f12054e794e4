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
from gkd_methods_builtin.continuation_kd import SPEC
from gkd_methods_builtin.continuation_kd.method import ContinuationKD, continuation_weight

B, L, C, V = 4, 5, 3, 7


def _method(config=None, family="encoder"):
    head = "lm" if family == "decoder" else None
    return build_method("continuation-kd", config,
                        student=shape(family, num_layers=2, head=head, num_labels=C, vocab_size=V),
                        teachers={"t": shape(family, num_layers=4, head=head, num_labels=C, vocab_size=V)})


def test_psi_schedule():
    # ψ = progress / 1.333 up to progress 0.666, then 1
    cases = {(0, 1000): 0.0, (300, 1000): 0.3 / 1.333, (666, 1000): 0.666 / 1.333, (667, 1000): 1.0,
             (999, 1000): 1.0, (1, 3): (1 / 3) / 1.333, (2, 3): 1.0}
    m = _method()
    for (it, total), psi in cases.items():
        assert m.psi(step(it, total)) == pytest.approx(psi, abs=1e-12), (it, total)
    m = _method({"psi_denominator": 1.0, "psi_switch": 0.5})
    assert [m.psi(step(it, 10)) for it in (0, 2, 5, 6)] == pytest.approx([0.0, 0.2, 0.5, 1.0])
    assert continuation_weight(0.9, 2.0, 1.0) == pytest.approx(0.45)  # switch 1: never switches


def test_phi_schedule_is_annealing_kds_with_tau_10():
    m = _method()
    # N = 100, τ_max 10: T = ⌈(100 − i)/10⌉ → φ = 1 − (T − 1)/10
    for it, phi in ((0, 0.1), (9, 0.1), (10, 0.2), (55, 0.6), (89, 0.9), (90, 1.0), (99, 1.0)):
        assert m.phi(step(it, 100)) == pytest.approx(phi, abs=1e-12), it
    assert _method({"max_temperature": 4}).phi(step(0, 8)) == pytest.approx(0.25)


def _reference(z, zt, h, phi, psi, margin, keep=None):
    """mean_b(ψ·H_b + (1 − ψ)·MSE_b(z, φ·ẑ)·[MSE_b > m·φ]), written out per example."""
    out = []
    for b in range(z.shape[0]):
        diff = (z[b] - phi * zt[b]) ** 2
        mse_b = diff.mean() if keep is None else diff[keep[b]].mean()
        gate = float(mse_b > margin * phi)
        out.append(psi * h[b] + (1 - psi) * mse_b * gate)
    return torch.stack(out).mean()


def test_loss_matches_formula_and_the_margin_drops_easy_examples():
    g = torch.Generator().manual_seed(0)
    zt = 4 * torch.randn(B, C, generator=g)
    st = step(60, 100)  # T = ⌈40·10/100⌉ = 4: φ = 0.7; ψ = 0.6/1.333
    phi, psi = 0.7, 0.6 / 1.333
    z = phi * zt.clone()
    z[0] += 0.1   # MSE 0.01 ≤ margin·φ: dropped
    z[1] += 2.0   # MSE 4 > 0.7: kept
    z[2] += torch.tensor([1.0, -1.0, 0.5])  # MSE 0.75 > 0.7: kept
    z[3] += torch.tensor([0.9, 0.8, -0.7])  # MSE 0.647 ≤ 0.7: dropped
    labels = torch.tensor([0, 2, 1, 1])
    batch = {"attention_mask": torch.ones(B, L, dtype=torch.long), "labels": labels}
    m = _method({"hard_weight": 1.0})
    terms = m.loss(st, {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert set(terms) == {"soft", "hard"}
    h = F.cross_entropy(z, labels, reduction="none")
    expected = _reference(z, zt, h, phi, psi, 1.0)
    assert (terms["soft"] + terms["hard"]).item() == pytest.approx(expected.item(), rel=1e-6)
    mse = ((z - phi * zt) ** 2).mean(-1)
    assert mse[[0, 3]].max() <= 0.7 < mse[[1, 2]].min()  # the gate splits the batch as intended
    assert terms["soft"].item() == pytest.approx((1 - psi) * mse[[1, 2]].sum().item() / B, rel=1e-6)
    assert terms["hard"].item() == pytest.approx(psi * h.mean().item(), rel=1e-6)
    # margin 0 keeps every example; a larger margin drops all of them
    zero = _method({"margin": 0.0}).loss(st, {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert zero["soft"].item() == pytest.approx((1 - psi) * mse.mean().item(), rel=1e-6)
    big = _method({"margin": 100.0}).loss(st, {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert big["soft"].item() == 0.0


def test_gated_out_examples_get_no_gradient():
    g = torch.Generator().manual_seed(2)
    zt = 4 * torch.randn(B, C, generator=g)
    z = (0.1 * zt).clone()  # φ = 0.1 at the start
    z[1:] += 3.0
    z.requires_grad_(True)
    batch = {"attention_mask": torch.ones(B, L, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 0])}
    terms = _method({"hard_weight": 0}).loss(step(0, 10), {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert set(terms) == {"soft"}
    terms["soft"].backward()
    assert z.grad[0].abs().max() == 0 and (z.grad[1:].abs().sum(-1) > 0).all()


def test_token_logits_per_example_means_over_real_tokens():
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, 3:] = 0
    mask[3, 2:] = 0
    zt = 2 * torch.randn(B, L, V, generator=g)
    z = torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, -1] = -100
    labels[~mask.bool()] = -100
    batch = {"attention_mask": mask, "labels": labels}
    st = step(40, 100)  # T = 6: φ = 0.5; ψ = 0.4/1.333
    m = _method({"margin": 0.5}, family="decoder")
    view = outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)})
    terms = m.loss(st, {}, 0, view)
    h = view.student.task_loss_per_example
    expected = _reference(z, zt, h, 0.5, 0.4 / 1.333, 0.5, keep=mask.bool())
    assert (terms["soft"] + terms["hard"]).item() == pytest.approx(expected.item(), rel=1e-5)
    z2, zt2 = z.clone(), zt.clone()
    z2[~mask.bool()], zt2[~mask.bool()] = 1e3, -1e3  # padding must not matter
    again = m.loss(st, {}, 0, outputs(batch, ModelView({}, z2), {"t": ModelView({}, zt2)}))
    assert again["soft"].item() == pytest.approx(terms["soft"].item(), rel=1e-6)


def test_errors_and_claims():
    z = torch.randn(2, C)
    no_labels = outputs({"attention_mask": torch.ones(2, 3, dtype=torch.long)}, ModelView({}, z), {"t": ModelView({}, z)})
    with pytest.raises(GkdError, match=r"continuation-kd: the batch has no labels.*set hard_weight: 0"):
        _method().loss(step(), {}, 0, no_labels)
    assert set(_method({"hard_weight": 0}).loss(step(), {}, 0, no_labels)) == {"soft"}
    (issue,) = check_features(SPEC, {}, MethodContext(shape(), {"t": shape(head="none")}, "sequence_classification", "task"))
    assert "continuation-kd: teacher 't' has no task head" in issue.message
    assert ContinuationKD.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}
    assert ContinuationKD.exclusive({"hard_weight": 0}) == {}
    with pytest.raises(GkdError, match=r"config\.psi_switch: 2 is greater than the maximum of 1"):
        build_method("continuation-kd", {"psi_switch": 2})


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, {"margin": 0.0}),
    ("encoder", "masked_lm", {"margin": 0.0, "hard_weight": 0.5}),
    ("decoder", None, {"margin": 0.0}),
    ("decoder", None, {"margin": 1e-4, "max_temperature": 2, "psi_switch": 0.4}),
])
def test_conformance(family, task, config):
    report = check_conformance("continuation-kd", config, family=family, task=task)
    assert [set(t) for t in report.terms] == [{"soft", "hard"}] * 2
    assert report.terms[0]["hard"] == 0.0  # ψ = 0 at the start of the stage
    assert report.states == [{}, {}]


def test_the_default_margin_drops_every_example_of_near_random_tiny_models():
    """Untrained tiny models' logits are close together: with margin 1 nothing but ψ·H is left."""
    models = tiny_models("encoder")
    result = run_step(build_method("continuation-kd", models=models), models, tiny_batch("encoder"), iteration=5, total=10)
    assert result.terms["continuation-kd.soft"].item() == 0.0 and result.terms["continuation-kd.hard"].item() > 0


def _train(family, config, steps=15):
    models = tiny_models(family)
    method = build_method("continuation-kd", config, models=models)
    batch = tiny_batch(family)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        result = run_step(method, models, batch, iteration=3, total=10)  # ψ = 0.3/1.333, φ = 0.4
        result.loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in result.terms.items()} | {"loss": float(result.loss.detach())})
    return history


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_loss_decreases_on_tiny_models(family):
    soft_only = _train(family, {"margin": 0.0, "hard_weight": 0})
    assert soft_only[-1]["loss"] < 0.5 * soft_only[0]["loss"], soft_only
    full = _train(family, {"margin": 0.0})
    assert full[-1]["loss"] < 0.95 * full[0]["loss"], full
    assert full[-1]["continuation-kd.hard"] < 0.9 * full[0]["continuation-kd.hard"], full
