from __future__ import annotations

import json

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
from gkd_methods_builtin.rail_kd import SPEC

S, T, HS, HT, B, L = 3, 8, 16, 24, 3, 5


def _method(family: str = "encoder", **config):
    return build_method("rail-kd", config, student=shape(family, num_layers=S, hidden_size=HS),
                        teachers={"t": shape(family, num_layers=T, hidden_size=HT)}, with_state=True, seed=0)


def _hidden(layers: int, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    feats = {"embeddings": torch.randn(B, L, width, generator=gen)}
    feats |= {f"layers.{i}.output": torch.randn(B, L, width, generator=gen) for i in range(layers)}
    return feats


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return mask


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = [h[b][mask[b].bool()].mean(0) for b in range(h.shape[0])]
    return torch.stack(rows)


def _dist(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return ((s - t) ** 2).sum(-1).mean()


def test_plan_pairs_student_intermediate_layers_with_a_sorted_random_draw():
    m, state = _method()
    plan = m.plan(step(seed=3), state, 0, None)
    layers = state["teacher_layers"]
    assert len(layers) == S - 1 and layers == sorted(layers) and all(1 <= x <= T - 1 for x in layers)
    assert plan.models["student"].features == {"layers.0.output", "layers.1.output"}  # hidden states 1, 2
    assert plan.models["teacher:t"].features == {f"layers.{x - 1}.output" for x in layers}
    assert m.plan(step(), state, 1, None) is None
    full, full_state = _method(embeddings=True, final=True, layer_selection="stride")
    assert full_state["teacher_layers"] == [2, 4]  # k = 8 // 3
    assert full.pairs(full_state["teacher_layers"]) == [("embeddings", "embeddings"), ("layers.0.output", "layers.1.output"),
                                                       ("layers.1.output", "layers.3.output"),
                                                       ("layers.2.output", "layers.7.output")]


def test_draw_uses_the_step_generator_and_is_kept_within_an_epoch():
    m, state = _method()
    m.plan(step(iteration=0, seed=11, epoch=0), state, 0, None)
    first = list(state["teacher_layers"])
    picks = torch.randperm(T - 1, generator=torch.Generator().manual_seed(11))[: S - 1] + 1
    assert first == sorted(picks.tolist())
    assert state | {"teacher_layers": None} == {"teacher_layers": None, "block": 0, "epoch": 0, "iteration": 0}
    for it in range(1, 6):  # same epoch, other generators: unchanged
        m.plan(step(iteration=it, seed=100 + it, epoch=0), state, 0, None)
        assert state["teacher_layers"] == first
    draws = {tuple(first)}
    for epoch in range(1, 6):
        m.plan(step(iteration=10 * epoch, seed=epoch, epoch=epoch), state, 0, None)
        assert state["block"] == epoch and state["epoch"] == epoch and state["iteration"] == 10 * epoch
        expected = torch.randperm(T - 1, generator=torch.Generator().manual_seed(epoch))[: S - 1] + 1
        assert state["teacher_layers"] == sorted(expected.tolist())
        draws.add(tuple(state["teacher_layers"]))
    assert len(draws) > 1


def test_resampling_by_steps_when_epochs_is_zero():
    m, state = _method(resample_every_epochs=0, resample_every_steps=4)
    m.plan(step(iteration=3, seed=1), state, 0, None)
    assert state["block"] == 0
    kept = list(state["teacher_layers"])
    m.plan(step(iteration=3, seed=2, epoch=5), state, 0, None)
    assert state["teacher_layers"] == kept  # epochs do not matter here
    m.plan(step(iteration=4, seed=2), state, 0, None)
    assert state["block"] == 1


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_concat_loss_matches_the_paper_formula_and_ignores_padding(family):
    m, state = _method(family, variant="concat", final=True, inter_weight=0.5)
    m.plan(step(seed=5), state, 0, None)
    g = torch.Generator().manual_seed(0)
    sf, tf, mask = _hidden(S, HS, g), _hidden(T, HT, g), _mask()
    terms = m.loss(step(), state, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    assert set(terms) == {"rail"}
    s_taps = ["layers.0.output", "layers.1.output", "layers.2.output"]
    t_taps = [f"layers.{x - 1}.output" for x in state["teacher_layers"]] + [f"layers.{T - 1}.output"]
    hs = torch.cat([_pool(sf[k], mask) for k in s_taps], -1) @ m.student_proj.weight.T + m.student_proj.bias
    ht = torch.cat([_pool(tf[k], mask) for k in t_taps], -1) @ m.teacher_proj.weight.T + m.teacher_proj.bias
    assert m.student_proj.in_features == 3 * HS and m.teacher_proj.in_features == 3 * HT
    assert terms["rail"].item() == pytest.approx(0.5 * _dist(hs, ht).item(), rel=1e-5)
    for f in (sf, tf):  # padded positions hold anything: the loss does not move
        for v in f.values():
            v[~mask.bool()] = 1e4
    again = m.loss(step(), state, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    assert again["rail"].item() == pytest.approx(terms["rail"].item(), rel=1e-5)
    terms["rail"].backward()
    assert m.student_proj.weight.grad is not None and m.teacher_proj.weight.grad is not None


def test_layer_wise_loss_weights_each_pair_by_its_alpha():
    m, state = _method(embeddings=True, layer_wise_alpha=[0.5, 2.0, 3.0], inter_weight=1.0)
    m.plan(step(seed=2), state, 0, None)
    g = torch.Generator().manual_seed(1)
    sf, tf, mask = _hidden(S, HS, g), _hidden(T, HT, g), _mask()
    terms = m.loss(step(), state, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    pairs = [("embeddings", "embeddings")] + [(f"layers.{j - 1}.output", f"layers.{x - 1}.output")
                                              for j, x in zip((1, 2), state["teacher_layers"], strict=True)]
    ws, bs, wt, bt = m.student_proj.weight, m.student_proj.bias, m.teacher_proj.weight, m.teacher_proj.bias
    expected = sum(a * _dist(_pool(sf[s], mask) @ ws.T + bs, _pool(tf[t], mask) @ wt.T + bt)
                   for a, (s, t) in zip([0.5, 2.0, 3.0], pairs, strict=True))
    assert terms["rail"].item() == pytest.approx(expected.item(), rel=1e-5)
    scalar, scalar_state = _method(embeddings=True, layer_wise_alpha=2.0)
    scalar_state["teacher_layers"] = state["teacher_layers"]
    scalar.load_state_dict(m.state_dict())
    two = scalar.loss(step(), scalar_state, 0, outputs({"attention_mask": mask}, ModelView(sf, None),
                                                       {"t": ModelView(tf, None)}))
    one = sum(_dist(_pool(sf[s], mask) @ ws.T + bs, _pool(tf[t], mask) @ wt.T + bt) for s, t in pairs)
    assert two["rail"].item() == pytest.approx(0.3334 * 2.0 * one.item(), rel=1e-5)


def test_soft_and_hard_terms():
    m, state = _method(soft_weight=0.25, hard_weight=0.5, temperature=10.0, inter_weight=0)
    assert m.plan(step(), state, 0, None).models["student"].features == frozenset()
    g = torch.Generator().manual_seed(4)
    z, zt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    batch = {"attention_mask": _mask(), "labels": torch.tensor([0, 2, 1])}
    terms = m.loss(step(), state, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    p = torch.softmax(zt / 10, -1)
    assert terms["soft"].item() == pytest.approx(0.25 * -(p * torch.log_softmax(z / 10, -1)).sum(-1).mean().item(),
                                                 rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(z, batch["labels"]).item(),
                                                 rel=1e-5)
    assert type(m).exclusive(m.config) == {"hard_loss": "hard_weight"}
    assert type(m).exclusive(_method()[0].config) == {}


def test_checks_name_the_field():
    ctx = MethodContext(shape(num_layers=4), {"t": shape(num_layers=2)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field is None and "at least as deep as the student" in issue.message
    one = MethodContext(shape(num_layers=1), {"t": shape(num_layers=4)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, one)
    assert issue.field == "final" and "no intermediate layer" in issue.message
    assert check_features(SPEC, {"final": True}, one) == []
    ok = MethodContext(shape(num_layers=3), {"t": shape(num_layers=6)}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {"layer_wise_alpha": [1.0]}, ok)
    assert issue.field == "layer_wise_alpha" and "has 1 weights, but 2 layer pairs" in issue.message
    (issue,) = check_features(SPEC, {"layer_wise_alpha": [1.0, 1.0], "variant": "concat"}, ok)
    assert issue.field == "layer_wise_alpha" and "layer_wise only" in issue.message
    headless = MethodContext(shape(num_layers=3), {"t": shape(num_layers=6, head="none")}, "sequence_classification",
                             "pretrain")
    assert check_features(SPEC, {}, headless) == []
    (issue,) = check_features(SPEC, {"soft_weight": 0.3}, headless)
    assert issue.field == "soft_weight" and "soft_weight: 0" in issue.message
    (issue,) = check_features(SPEC, {"inter_weight": 0}, ok)
    assert issue.field == "inter_weight"
    with pytest.raises(GkdError, match="at least as deep"):
        build_method("rail-kd", {}, student=shape(num_layers=4), teachers={"t": shape(num_layers=2)}, check=False)


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {}),
    ("encoder", {"variant": "concat", "embeddings": True, "final": True, "soft_weight": 0.3333,
                 "hard_weight": 0.3333, "temperature": 10.0}),
    ("decoder", {}),
    ("decoder", {"variant": "concat", "layer_selection": "stride", "soft_loss": "kl", "soft_weight": 1.0}),
])
def test_rail_kd_conformance(family, config):
    check_conformance("rail-kd", config, family=family, student_layers=3, teacher_layers=6, steps=2)


def test_training_decreases_the_rail_term():
    models = tiny_models("encoder", student_layers=3, teacher_layers=8, student_hidden_size=16)
    method = build_method("rail-kd", {"variant": "concat", "inter_weight": 1.0}, models=models, seed=0)
    sel = selected(method)
    batch = tiny_batch("encoder", batch=4)
    opt = torch.optim.Adam([*models["student"].parameters(), *method.parameters()], lr=3e-3)
    values = []
    for it in range(15):
        result = run_step(sel, models, batch, iteration=it, total=15, after_step=True)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        values.append(result.terms["rail-kd.rail"].item())
    assert values[-1] < 0.5 * values[0], values


def test_engine_redraws_per_epoch_and_the_state_round_trips():
    models = tiny_models("decoder", student_layers=3, teacher_layers=8)
    method = build_method("rail-kd", {}, models=models, seed=0)
    sel = selected(method)
    batch = tiny_batch("decoder")
    draws = []
    for it in range(12):
        run_step(sel, models, batch, iteration=it, total=12, epoch=it // 3, after_step=True)
        draws.append(tuple(sel.state["teacher_layers"]))
        assert sel.state["block"] == sel.state["epoch"] == it // 3 and sel.state["iteration"] == 3 * (it // 3)
        assert json.loads(json.dumps(sel.state)) == sel.state
    for e in range(4):  # fixed within an epoch
        assert len(set(draws[3 * e: 3 * e + 3])) == 1
    assert len(set(draws)) > 1  # redrawn when the epoch changes
    assert all(len(d) == 2 and list(d) == sorted(d) and all(1 <= x <= 7 for x in d) for d in draws)
    # A resumed method continues the epoch with the checkpointed draw.
    resumed = build_method("rail-kd", {}, models=models, seed=0)
    state = json.loads(json.dumps(sel.state))
    run_step(selected(resumed, state=state), models, batch, iteration=12, total=24, epoch=3)
    assert tuple(state["teacher_layers"]) == draws[-1]
