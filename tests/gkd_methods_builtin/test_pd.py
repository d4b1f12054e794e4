from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import MethodContext, ModelView, check_features
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
from gkd_methods_builtin.kd.method import KD
from gkd_methods_builtin.pd import SPEC


def test_pd_is_kd_with_pds_defaults():
    pd = build_method("pd")
    assert isinstance(pd, KD) and pd.name == "pd"
    assert pd.config == {"temperature": 1.0, "soft_loss": "ce", "soft_weight": 1.0, "hard_weight": 0.0}
    assert type(pd).exclusive(pd.config) == {}  # no hard loss: another method of the stage may own it
    assert type(pd).exclusive({**pd.config, "hard_weight": 1.0}) == {"hard_loss": "hard_weight"}


def test_pd_loss_is_soft_cross_entropy_at_t1_without_hard_term():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    batch = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}
    terms = build_method("pd").loss(step(), {}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert set(terms) == {"soft"}
    expected = -(torch.softmax(zt, -1) * torch.log_softmax(z, -1)).sum(-1).mean()
    assert terms["soft"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_pd_token_logits_skip_padding():
    b, s, v = 3, 5, 7
    g = torch.Generator().manual_seed(1)
    z, zt = torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[2, 3:] = 0
    pd = build_method("pd", student=shape("decoder", 2), teachers={"t": shape("decoder")})
    terms = pd.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView({}, z), {"t": ModelView({}, zt)}))
    per_pos = -(torch.softmax(zt, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert terms["soft"].item() == pytest.approx(per_pos[mask.bool()].mean().item(), rel=1e-6)


def test_pd_needs_a_teacher_with_a_head():
    ctx = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field == "soft_weight" and issue.message.startswith("pd: teacher 't' has no task head")


@pytest.mark.parametrize(("family", "task"), [("encoder", None), ("encoder", "masked_lm"), ("decoder", None)])
def test_pd_conformance(family, task):
    report = check_conformance("pd", family=family, task=task)
    assert set(report.terms[0]) == {"soft"}


def test_pd_soft_term_decreases_on_tiny_models():
    models = tiny_models("encoder")
    pd = build_method("pd", models=models)
    batch = tiny_batch("encoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    values = []
    for i in range(12):
        result = run_step(pd, models, batch, iteration=i, total=12)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        values.append(result.terms["pd.soft"].item())
    # soft CE is bounded below by the teacher's entropy; the KL part must shrink
    t_logits = models["teacher:t"](**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    entropy = -(F.softmax(t_logits, -1) * F.log_softmax(t_logits, -1)).sum(-1).mean().item()
    assert values[-1] - entropy < 0.5 * (values[0] - entropy)
