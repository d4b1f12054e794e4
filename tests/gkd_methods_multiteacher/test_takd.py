"""TAKD: one link of a teacher-assistant chain — (1−λ)·hard + λ·τ²·KL from the previous link.
The chain itself (hand-off, reuse, resume) is tested in tests/gkd/engine/test_chain.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def _kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per position, summed over the last dim (plain torch)."""
    p = F.softmax(teacher / tau, dim=-1)
    return (p * (torch.log(p) - F.log_softmax(student / tau, dim=-1))).sum(-1)


def test_classification_terms_are_the_papers_convex_combination_at_tau_10():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 2])
    m = build_method("takd")  # defaults: τ 10, λ = soft_weight = 0.5, hard_weight = 0.5, soft_loss kl
    assert m.config == {"temperature": 10.0, "soft_loss": "kl", "soft_weight": 0.5, "hard_weight": 0.5}
    plan = m.plan(step(), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:t"}
    assert m.plan(step(), {}, 1, None) is None
    terms = m.loss(step(), {}, 0, outputs({"labels": labels}, ModelView({}, z), {"t": ModelView({}, t)}))
    assert terms["soft"].item() == pytest.approx(0.5 * 100 * _kl(z, t, 10.0).mean().item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.5 * F.cross_entropy(z, labels).item(), rel=1e-6)


def test_token_logits_average_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.full((2, 5), -100)
    labels[0, :4], labels[1, :1] = torch.tensor([1, 2, 3, 4]), torch.tensor([5])
    m = build_method("takd", {"temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.3},
                     student=shape("decoder", 2, vocab_size=7), teachers={"ta": shape("decoder", 3, vocab_size=7)})
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask, "labels": labels}, ModelView({}, z),
                                          {"ta": ModelView({}, t)}))
    per_token = _kl(z, t, 2.0)
    expected = (per_token * mask).sum() / mask.sum() * 4.0
    assert terms["soft"].item() == pytest.approx(0.7 * expected.item(), rel=1e-5)
    valid = labels != -100
    ce = F.cross_entropy(z[valid], labels[valid])
    assert terms["hard"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)


def test_zero_weights_leave_their_term_out_and_the_hard_loss_is_claimed():
    m = build_method("takd", {"hard_weight": 0.0})
    terms = m.loss(step(), {}, 0, outputs({"labels": torch.tensor([0, 1])}, ModelView({}, torch.zeros(2, 3)),
                                          {"t": ModelView({}, torch.ones(2, 3))}))
    assert set(terms) == {"soft"}
    assert type(m).exclusive({"hard_weight": 0.5}) == {"hard_loss": "hard_weight"}
    assert type(m).exclusive({"hard_weight": 0.0}) == {}


def test_a_link_reads_exactly_one_teacher_with_a_task_head():
    with pytest.raises(GkdError, match=r"takd: a link of a teacher-assistant chain distils from one teacher, the "
                                       r"previous link; it was given 2 \(a, b\)"):
        build_method("takd", teachers={"a": shape(), "b": shape(num_layers=3)})
    with pytest.raises(GkdError, match="takd: teacher 'ta' has no task head"):
        build_method("takd", teachers={"ta": shape(head="none")})


def test_takd_is_listed_as_a_teacher_assistant_method():
    from gkd.plugins import load_plugin_manager

    spec = load_plugin_manager().registry.get("takd").spec
    assert spec.kind == "teacher-assistant" and spec.stages == ("pretrain", "task")
    assert "Mirzadeh" in spec.citation and "AAAI 2020" in spec.citation


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_takd_conformance(family):
    report = check_conformance("takd", {"temperature": 4.0}, family=family, teachers={"ta": 3})
    assert set(report.plans[0][0]) == {"student", "teacher:ta"}
    assert set(report.terms[0]) == {"soft", "hard"}


def test_takd_loss_decreases_on_a_tiny_link():
    models = tiny_models("encoder", teachers={"ta": 3}, student_layers=1)
    sel, batch = selected(build_method("takd", models=models)), tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(12):
        result = run_step(sel, models, batch, iteration=i, total=12)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append(result.loss.item())
    assert history[-1] < 0.7 * history[0], history
