from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import MethodContext, ModelView, check_features
from gkd.testing import build_method, check_conformance, outputs, shape, step
from gkd_methods_builtin.kd import SPEC


def _batch(b: int = 4, s: int = 6, token_labels: bool = False) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 4:] = 0
    labels = torch.zeros(b, s, dtype=torch.long).masked_fill(mask == 0, -100) if token_labels else torch.zeros(b, dtype=torch.long)
    return {"input_ids": torch.zeros(b, s, dtype=torch.long), "attention_mask": mask, "labels": labels}


def test_kd_plan_requests_student_and_teacher_only_once():
    kd, state = build_method("kd", with_state=True)
    plan = kd.plan(step(), state, 0, None)
    assert set(plan.models) == {"student", "teacher:t"}
    assert kd.plan(step(), state, 1, None) is None


@pytest.mark.parametrize("soft", ["kl", "ce", "mse"])
def test_kd_loss_matches_formula(soft):
    g = torch.Generator().manual_seed(1)
    z, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    hard = torch.tensor(0.7)
    kd = build_method("kd", {"temperature": 4.0, "soft_loss": soft, "soft_weight": 0.5, "hard_weight": 0.25})
    terms = kd.loss(step(), {}, 0, outputs(_batch(), ModelView({}, z, hard), {"t": ModelView({}, zt)}))
    tau = 4.0
    p = torch.softmax(zt / tau, -1)
    if soft == "kl":
        expected = tau**2 * (p * (p.log() - torch.log_softmax(z / tau, -1))).sum(-1).mean()
    elif soft == "ce":
        expected = -(p * torch.log_softmax(z / tau, -1)).sum(-1).mean()
    else:
        expected = ((z - zt) ** 2).mean()
    assert terms["soft"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.25 * 0.7)


def test_kd_hard_term_is_the_task_loss_of_the_labels():
    g = torch.Generator().manual_seed(3)
    z, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    batch = _batch() | {"labels": torch.tensor([0, 2, 1, 2])}
    kd = build_method("kd", {"soft_weight": 0.0, "hard_weight": 2.0})
    terms = kd.loss(step(), {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert set(terms) == {"hard"}
    assert terms["hard"].item() == pytest.approx(2.0 * F.cross_entropy(z, batch["labels"]).item(), rel=1e-6)


def test_kd_token_logits_skip_padding_and_hard_loss_averages_all_labelled_tokens():
    b, s, v = 4, 6, 5
    g = torch.Generator().manual_seed(2)
    z, zt = torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g)
    batch = _batch(b, s, token_labels=True)
    kd = build_method("kd", {"hard_weight": 1.0}, student=shape("decoder", 2), teachers={"t": shape("decoder")})
    terms = kd.loss(step(), {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    p = torch.softmax(zt, -1)
    per_pos = (p * (p.log() - torch.log_softmax(z, -1))).sum(-1)
    keep = batch["attention_mask"].bool()
    assert terms["soft"].item() == pytest.approx(per_pos[keep].mean().item(), rel=1e-5)
    # one mean over the 22 labelled tokens (example 0 has 4, the others 6), not a mean of per-example means
    per_tok = F.cross_entropy(z.transpose(1, 2), torch.zeros(b, s, dtype=torch.long), reduction="none")
    assert terms["hard"].item() == pytest.approx(per_tok[keep].mean().item(), rel=1e-5)


def test_kd_check_reports_a_teacher_without_head_on_soft_weight():
    ctx = build_method("kd").context
    headless = MethodContext(ctx.student, {"t": shape(head="none")}, ctx.task, "task")
    (issue,) = check_features(SPEC, {}, headless)
    assert issue.field == "soft_weight" and issue.model == "teacher 't'"
    assert "kd: teacher 't' has no task head" in issue.message and "soft_weight: 0" in issue.message
    assert check_features(SPEC, {"soft_weight": 0}, headless) == []
    other = MethodContext(ctx.student, {"t": shape(num_labels=5)}, ctx.task, "task")
    (issue,) = check_features(SPEC, {}, other)
    assert "student has 3 classes and teacher 't' 5" in issue.message


def test_kd_config_errors_name_the_field():
    from gkd.methods import GkdError

    with pytest.raises(GkdError, match=r"config\.soft_loss: 'kll' is not one of"):
        build_method("kd", {"soft_loss": "kll"})
    with pytest.raises(GkdError, match=r"config\.temprature: unknown key; did you mean 'temperature'"):
        build_method("kd", {"temprature": 2.0})


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, None),
    ("encoder", "masked_lm", {"soft_loss": "ce", "temperature": 2.0}),
    ("decoder", None, {"soft_loss": "mse"}),
])
def test_kd_conformance(family, task, config):
    report = check_conformance("kd", config, family=family, task=task)
    assert set(report.terms[0]) == {"soft", "hard"}
