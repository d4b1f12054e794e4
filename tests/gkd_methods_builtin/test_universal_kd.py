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
from gkd_methods_builtin.universal_kd import SPEC

S, T, HS, HT, U, B, L = 3, 4, 8, 12, 5, 3, 5


def _method(config=None, family="encoder", **kw):
    return build_method("universal-kd", config, student=shape(family, num_layers=S, hidden_size=HS),
                        teachers={"t": shape(family, num_layers=T, hidden_size=HT)}, seed=0, **kw)


def _hidden(n: int, h: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.output": torch.randn(B, L, h, generator=g) for i in range(n)}


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 2:] = 0
    return mask


def _universal(student: list[torch.Tensor], teacher: list[torch.Tensor], ws: list[torch.Tensor],
               wt: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i mean_b KL(softmax c_i ‖ softmax z_i), z_i = W_i s_i, ẑ_j = W_j t_j, c_i = Σ_j softmax_j(z_i·ẑ_j) ẑ_j."""
    zt = [t @ w.T for t, w in zip(teacher, wt, strict=True)]
    total = torch.zeros(())
    for s, w in zip(student, ws, strict=True):
        z = s @ w.T
        alpha = torch.softmax(torch.stack([(z * t).sum(-1) for t in zt], -1), -1)
        c = sum(alpha[:, j : j + 1] * zt[j] for j in range(len(zt)))
        p, log_q = torch.softmax(c, -1), torch.log_softmax(z, -1)
        total = total + (p * (p.log() - log_q)).sum(-1).mean()
    return total


def _weights(m) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [p.weight for p in m.student_proj], [p.weight for p in m.teacher_proj]


def test_plan_reads_intermediate_layers_or_all():
    m, state = _method(with_state=True)
    plan = m.plan(step(), state, 0, None)
    assert plan.models["student"].features == {"layers.0.output", "layers.1.output"}  # hidden states 1..S-1
    assert plan.models["teacher:t"].features == {"layers.0.output", "layers.1.output", "layers.2.output"}
    assert len(m.student_proj) == S - 1 and len(m.teacher_proj) == T - 1
    assert all(p.bias is None and p.out_features == HS for p in [*m.student_proj, *m.teacher_proj])
    every, every_state = _method({"layers": "all", "size": U}, with_state=True)
    assert every.plan(step(), every_state, 0, None).models["teacher:t"].features == {f"layers.{j}.output" for j in range(T)}
    assert every.student_proj[0].out_features == U


def test_cls_loss_matches_formula_and_trains_the_projections():
    g = torch.Generator().manual_seed(0)
    sf, tf = _hidden(S, HS, g), _hidden(T, HT, g)
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    batch = {"attention_mask": _mask(), "labels": torch.tensor([0, 2, 1])}
    m = _method({"size": U, "universal_weight": 0.5, "soft_weight": 0.5, "hard_weight": 0})
    terms = m.loss(step(), {}, 0, outputs(batch, ModelView(sf, z), {"t": ModelView(tf, zt)}))
    assert set(terms) == {"universal", "soft"}
    expected = _universal([sf[f"layers.{i}.output"][:, 0] for i in range(S - 1)],
                          [tf[f"layers.{j}.output"][:, 0] for j in range(T - 1)], *_weights(m))
    assert terms["universal"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    p = torch.softmax(zt, -1)
    assert terms["soft"].item() == pytest.approx(0.5 * -(p * torch.log_softmax(z, -1)).sum(-1).mean().item(), rel=1e-5)
    terms["universal"].backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in [*m.student_proj, *m.teacher_proj])


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_mean_pooling_averages_real_tokens_and_decoder_cls_is_the_last_real_token(family):
    g = torch.Generator().manual_seed(1)
    sf, tf = _hidden(S, HS, g), _hidden(T, HT, g)
    mask = _mask()
    keep = mask.bool()
    for pooling in ("mean", "cls"):
        m = _method({"pooling": pooling, "layers": "all", "soft_weight": 0, "hard_weight": 0}, family=family)
        terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
        if pooling == "mean":
            def vec(x):
                return torch.stack([x[b][keep[b]].mean(0) for b in range(B)])
        elif family == "decoder":
            def vec(x):
                return x[torch.arange(B), mask.sum(-1) - 1]
        else:
            def vec(x):
                return x[:, 0]
        expected = _universal([vec(sf[f"layers.{i}.output"]) for i in range(S)],
                              [vec(tf[f"layers.{j}.output"]) for j in range(T)], *_weights(m))
        assert terms["universal"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5), pooling


def test_one_layer_model_needs_layers_all_and_soft_needs_teacher_logits():
    ctx = MethodContext(shape(num_layers=1), {"t": shape()}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field == "layers" and issue.model == "student"
    assert issue.message.startswith("universal-kd: layers: intermediate reads hidden states 1 to L-1")
    assert check_features(SPEC, {"layers": "all"}, ctx) == []
    with pytest.raises(GkdError, match="set layers: all"):
        build_method("universal-kd", {}, student=ctx.student, teachers=ctx.teachers, check=False)
    no_head = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, no_head)
    assert issue.field == "soft_weight"
    assert SPEC.factory.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {}),
    ("encoder", {"pooling": "mean", "layers": "all", "size": 6, "soft_loss": "kl"}),
    ("decoder", {}),
    ("decoder", {"pooling": "mean", "soft_weight": 0}),
])
def test_universal_kd_conformance(family, config):
    check_conformance("universal-kd", config, family=family)


def test_universal_term_decreases_on_tiny_models():
    models = tiny_models("encoder", student_layers=3, student_hidden_size=16)
    method = build_method("universal-kd", {"universal_weight": 1.0, "soft_weight": 0, "hard_weight": 0},
                          models=models, seed=0)
    sel, batch = selected(method), tiny_batch("encoder")
    opt = torch.optim.Adam([*models["student"].parameters(), *method.parameters()], lr=1e-2)
    values = []
    for _ in range(12):
        opt.zero_grad()
        result = run_step(sel, models, batch)
        result.loss.backward()
        opt.step()
        values.append(float(result.terms["universal-kd.universal"].detach()))
    assert values[-1] < 0.7 * values[0], values
