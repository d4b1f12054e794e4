from __future__ import annotations

import pytest
import torch

from gkd.methods.api import ModelView
from gkd.testing import build_method, outputs, step


def _batch(b: int = 4, s: int = 6) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 4:] = 0
    return {"input_ids": torch.zeros(b, s, dtype=torch.long), "attention_mask": mask, "labels": torch.zeros(b, dtype=torch.long)}


def test_kd_plan_requests_student_and_teacher_only_once():
    kd = build_method("kd")
    plan = kd.plan(step(), kd.initial_state(), 0, None)
    assert set(plan.models) == {"student", "teacher:t"}
    assert kd.plan(step(), {}, 1, None) is None


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


def test_kd_token_logits_skip_padding():
    b, s, v = 4, 6, 5
    g = torch.Generator().manual_seed(2)
    z, zt = torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g)
    batch = _batch(b, s)
    kd = build_method("kd", {"hard_weight": 0.0}, task="causal_lm")
    terms = kd.loss(step(), {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    p = torch.softmax(zt, -1)
    per_pos = (p * (p.log() - torch.log_softmax(z, -1))).sum(-1)
    keep = batch["attention_mask"].bool()
    assert terms["soft"].item() == pytest.approx(per_pos[keep].mean().item(), rel=1e-5)
    assert "hard" not in terms
