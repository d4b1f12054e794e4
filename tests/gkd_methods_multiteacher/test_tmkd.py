from __future__ import annotations

import pytest
import torch

from gkd.methods.api import ModelView
from gkd.testing import build_method, outputs, shape, step


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tmkd_averages_teachers(reduction):
    g = torch.Generator().manual_seed(0)
    z, t1, t2 = (torch.randn(4, 3, generator=g) for _ in range(3))
    m = build_method("tmkd", {"reduction": reduction, "hard_weight": 0.5}, teachers={"a": shape(), "b": shape()})
    plan = m.plan(step(), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:a", "teacher:b"}
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": torch.ones(4, 1)}, ModelView({}, z, torch.tensor(2.0)),
                                          {"a": ModelView({}, t1), "b": ModelView({}, t2)}))
    per = torch.stack([((z - t1) ** 2).mean(), ((z - t2) ** 2).mean()])
    expected = per.mean() if reduction == "mean" else per.sum()
    assert terms["soft"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["hard"].item() == pytest.approx(1.0)
