"""Theseus under tensor parallelism: three training steps (SGD) at TP=2 equal TP=1 — the same
replacement draws on every rank, the same losses and the same student gradients — for an encoder
and a GQA decoder pair. Teacher layers run inside the student's forward pass, sharded like the
student's own layers, with megatron's frozen-weight linear path; no communication of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.config.schema import apply_defaults
from gkd.engine.build import model_shape
from gkd.engine.step import SelectedMethod, distill_step, step_context
from gkd.methods.api import STUDENT, MethodContext, teacher_key
from gkd.models import ModelConfig, build_model, export_hf, from_pretrained
from gkd.plugins import load_plugin_manager
from gkd.testing import full_gradients

pytestmark = pytest.mark.distributed

TOL = 1e-5
GRAD_TOL = 1e-5  # relative to the largest entry: float32 sums reordered by the row-parallel all-reduce
SEED, TOTAL, STEPS = 3, 10, 3  # seed 3: draws (F,T), (T,F), (F,T) — both kinds of replacement, two patterns
TASK = {"encoder": "sequence_classification", "decoder": "causal_lm"}


def _batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    ids = torch.randint(5, 90, (3, 9), generator=g) * mask
    if family == "encoder":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(root: str, family: str) -> dict[str, Any]:
    teacher = from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)
    student = from_pretrained(Path(root) / f"{family}-student").train()
    models = {STUDENT: student, teacher_key("t"): teacher}
    spec = load_plugin_manager().registry.get("theseus").spec
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        TASK[family], "task", parallel.tp_world_size())
    method = spec.factory(apply_defaults(spec.config_schema, {}), ctx)
    method.setup(models)
    draws: list[list[bool]] = []
    plan = method.plan

    def recording(*args: Any) -> Any:  # what the engine's step really used
        result = plan(*args)
        if result is not None:
            draws.append(list(result.models[STUDENT].operations["layers"].kept))
        return result

    method.plan = recording  # type: ignore[method-assign]
    sel = SelectedMethod(method, 1.0, method.initial_state())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    losses, grads = [], []
    batch = _batch(family)
    for iteration in range(STEPS):
        contexts = {"theseus": step_context(SEED, "s", 0, 0, iteration, TOTAL, "theseus")}
        result = distill_step(models, {"theseus": sel}, contexts, batch)
        optimizer.zero_grad()
        result.loss.backward()
        grads.append(full_gradients(student))
        optimizer.step()
        losses.append(float(result.terms["theseus.hard"].detach()))
    return {"losses": losses, "grads": grads, "draws": draws,
            "teacher_grads": sum(p.grad is not None for p in teacher.parameters())}


def _both(root: str) -> dict[str, dict[str, Any]]:
    """One rank's results for both families (module level: the launcher imports it)."""
    return {family: _train(root, family) for family in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("theseus-tp")
    for family in ("encoder", "decoder"):
        common: dict[str, Any] = dict(family=family, vocab_size=97, hidden_size=32, ffn_hidden_size=64,
                                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                                      initializer_range=0.2)
        common |= (dict(head="classification", num_labels=3) if family == "encoder" else
                   dict(head="lm", num_kv_heads=2, hidden_act="silu", norm_eps=1e-6))
        # the teacher has twice the student's heads: Theseus needs equal widths only
        export_hf(build_model(ModelConfig(num_layers=4, num_attention_heads=4, **common), seed=1),
                  root / f"{family}-teacher")
        export_hf(build_model(ModelConfig(num_layers=2, num_attention_heads=2, **common), seed=2),
                  root / f"{family}-student")
    return str(root)


def test_theseus_three_steps_tp2_equal_tp1(checkpoints):
    reference = _both(checkpoints)  # TP=1 in this process
    ranks = parallel.run_distributed(_both, 2, checkpoints, tp=2, timeout_s=240)
    for family, ref in reference.items():
        assert ref["draws"] == [[False, True], [True, False], [False, True]], ref["draws"]
        assert ref["teacher_grads"] == 0
        assert ref["losses"][0] != pytest.approx(ref["losses"][1], rel=1e-3)  # the steps differ (draws, SGD)
        for rank in ranks:
            got = rank[family]
            assert got["draws"] == ref["draws"], family  # every rank replaced the same layers
            assert got["teacher_grads"] == 0
            for a, b in zip(got["losses"], ref["losses"], strict=True):
                assert abs(a - b) <= TOL * max(1.0, abs(b)), (family, got["losses"], ref["losses"])
            for step, (g_got, g_ref) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
                assert g_got.keys() == g_ref.keys(), (family, step)
                for name, g in g_ref.items():
                    diff = (g_got[name] - g).abs().max().item()
                    assert diff <= GRAD_TOL * max(1.0, g.abs().max().item()), f"{family} step {step} {name}: {diff}"
