from __future__ import annotations

import pytest
import torch

from gkd.methods import GkdError, MethodContext, ModelView, check_features
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
from gkd_methods_builtin.alp_kd import SPEC

S, T, H, B, L = 2, 4, 8, 3, 5


def _method(config=None, family="encoder", **kw):
    return build_method("alp-kd", config, student=shape(family, num_layers=S, hidden_size=H),
                        teachers={"t": shape(family, num_layers=T, hidden_size=H)}, **kw)


def _hidden(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.output": torch.randn(B, L, H, generator=g) for i in range(n)}


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 4:] = 0
    return mask


def _alp(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i MSE(s_i, c_i), c_i = Σ_j softmax_j(s_i·t_j) t_j, for [n, h] rows (the paper's eq.)."""
    total = torch.zeros(())
    for s in student:
        scores = torch.stack([(s * t).sum(-1) for t in teacher], -1)
        alpha = torch.softmax(scores, -1)
        c = sum(alpha[:, j : j + 1] * teacher[j] for j in range(len(teacher)))
        total = total + ((s - c) ** 2).mean()
    return total


def test_plan_reads_every_hidden_state_and_nothing_when_off():
    m, state = _method(with_state=True)
    plan = m.plan(step(), state, 0, None)
    assert plan.models["student"].features == {"layers.0.output", "layers.1.output"}
    assert plan.models["teacher:t"].features == {f"layers.{j}.output" for j in range(T)}
    assert m.plan(step(), state, 1, None) is None
    off, off_state = _method({"alp_weight": 0, "soft_weight": 0}, with_state=True)
    assert set(off.plan(step(), off_state, 0, None).models) == {"student"}


def test_cls_loss_matches_formula_with_lambda_soft_and_hard():
    g = torch.Generator().manual_seed(0)
    sf, tf = _hidden(S, g), _hidden(T, g)
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    batch = {"attention_mask": _mask(), "labels": torch.tensor([0, 2, 1])}
    m = _method({"alp_weight": 0.3, "soft_weight": 0.7, "temperature": 2.0, "hard_weight": 0.1})
    terms = m.loss(step(), {}, 0, outputs(batch, ModelView(sf, z), {"t": ModelView(tf, zt)}))
    expected = _alp([sf[f"layers.{i}.output"][:, 0] for i in range(S)], [tf[f"layers.{j}.output"][:, 0] for j in range(T)])
    assert terms["alp"].item() == pytest.approx(0.3 * expected.item(), rel=1e-5)
    p = torch.softmax(zt / 2, -1)
    assert terms["soft"].item() == pytest.approx(0.7 * -(p * torch.log_softmax(z / 2, -1)).sum(-1).mean().item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.1 * torch.nn.functional.cross_entropy(z, batch["labels"]).item(), rel=1e-5)
    assert SPEC.factory.exclusive(m.config) == {"hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive({**m.config, "hard_weight": 0}) == {}


def test_token_pooling_attends_per_token_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    sf, tf = _hidden(S, g), _hidden(T, g)
    mask = _mask()
    m = _method({"pooling": "tokens", "alp_weight": 1.0, "soft_weight": 0, "hard_weight": 0})
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    keep = mask.bool()
    real_s = [sf[f"layers.{i}.output"][keep] for i in range(S)]  # [n_real, h]: one row per real token
    real_t = [tf[f"layers.{j}.output"][keep] for j in range(T)]
    assert set(terms) == {"alp"}
    assert terms["alp"].item() == pytest.approx(_alp(real_s, real_t).item(), rel=1e-5)
    for f in (sf, tf):  # padded positions do not count
        for v in f.values():
            v[~keep] = 1e3
    again = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    assert again["alp"].item() == pytest.approx(terms["alp"].item(), rel=1e-6)


def test_decoder_cls_is_the_last_real_token_and_token_logits_skip_padding():
    g = torch.Generator().manual_seed(2)
    sf, tf = _hidden(S, g), _hidden(T, g)
    mask = _mask()
    z, zt = torch.randn(B, L, 11, generator=g), torch.randn(B, L, 11, generator=g)
    m = _method({"hard_weight": 0}, family="decoder")
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, z), {"t": ModelView(tf, zt)}))
    last = mask.sum(-1) - 1  # right padding: the last real token of each example
    s_last = [sf[f"layers.{i}.output"][torch.arange(B), last] for i in range(S)]
    t_last = [tf[f"layers.{j}.output"][torch.arange(B), last] for j in range(T)]
    assert terms["alp"].item() == pytest.approx(0.2 * _alp(s_last, t_last).item(), rel=1e-5)
    keep = mask.bool()
    ce = -(torch.softmax(zt, -1) * torch.log_softmax(z, -1)).sum(-1)[keep].mean()
    assert terms["soft"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_unequal_widths_and_missing_teacher_logits_are_config_issues():
    ctx = MethodContext(shape(num_layers=2, hidden_size=16), {"t": shape(hidden_size=32)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field == "alp_weight" and issue.model == "teacher 't'"
    assert issue.message.startswith("alp-kd: compares student and teacher hidden states without a projection")
    assert check_features(SPEC, {"alp_weight": 0}, ctx) == []
    with pytest.raises(GkdError, match="equal hidden sizes"):
        build_method("alp-kd", {}, student=ctx.student, teachers=ctx.teachers, check=False)
    no_head = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, no_head)
    assert issue.field == "soft_weight" and "soft_weight: 0" in issue.message
    assert check_features(SPEC, {"soft_weight": 0}, no_head) == []


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {}),
    ("encoder", {"pooling": "tokens", "soft_loss": "kl", "temperature": 2.0}),
    ("decoder", {}),
    ("decoder", {"pooling": "tokens", "soft_weight": 0}),
])
def test_alp_kd_conformance(family, config):
    check_conformance("alp-kd", config, family=family)


def test_alp_term_decreases_on_tiny_models():
    models = tiny_models("encoder")
    method = build_method("alp-kd", {"alp_weight": 1.0, "soft_weight": 0, "hard_weight": 0}, models=models)
    sel, batch = selected(method), tiny_batch("encoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    values = []
    for _ in range(12):
        opt.zero_grad()
        result = run_step(sel, models, batch)
        result.loss.backward()
        opt.step()
        values.append(float(result.terms["alp-kd.alp"].detach()))
    assert values[-1] < 0.7 * values[0], values
