"""The teacher-student parallel strategy end to end: one distillation step (TinyBERT with its
head-sharded attention-score loss, plus KD) at TP=2 equals TP=1 — loss, every term, and the
gradients of student and auxiliary parameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.engine.build import model_shape
from gkd.engine.step import SelectedMethod, distill_step, step_context
from gkd.methods.api import STUDENT, MethodContext, teacher_key
from gkd.models import ModelConfig, build_model, export_hf, from_pretrained, shard_kind
from gkd.models.sharding import ShardKind
from gkd.plugins import load_plugin_manager
from gkd.testing import full_gradients

pytestmark = pytest.mark.distributed

TOL = 1e-5


def _step(teacher_dir: str, student_dir: str) -> dict[str, Any]:
    teacher = from_pretrained(teacher_dir).eval().requires_grad_(False)
    student = from_pretrained(student_dir).train()
    registry = load_plugin_manager().registry
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        "sequence_classification", "task", parallel.tp_world_size())
    methods = {}
    for name, config in (("tinybert", {"prediction": True}), ("kd", {"temperature": 2.0})):
        spec = registry.get(name).spec
        from gkd.config.schema import apply_defaults

        torch.manual_seed(0)  # the auxiliary W_h is replicated: same init on every rank and TP size
        method = spec.factory(apply_defaults(spec.config_schema, config), ctx)
        methods[name] = SelectedMethod(method, 0.5, method.initial_state())
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    batch = {"input_ids": torch.randint(5, 90, (4, 10), generator=g), "attention_mask": mask,
             "labels": torch.tensor([0, 1, 2, 1])}
    contexts = {n: step_context(0, "s", 0, 0, 0, 10, n) for n in methods}
    result = distill_step({STUDENT: student, teacher_key("t"): teacher}, methods, contexts, batch)
    result.loss.backward()
    grads = full_gradients(student)
    assert set(grads) == {n for n, _ in student.named_parameters()}  # every student parameter got a gradient
    grads |= {f"aux.{n}": p.grad.clone() for n, p in methods["tinybert"].method.named_parameters()}
    return {"loss": float(result.loss.detach()), "terms": {k: float(v.detach()) for k, v in result.terms.items()},
            "grads": grads,
            "kinds": {n: shard_kind(n, student.model_config) is not ShardKind.REPLICATED for n, _ in student.named_parameters()}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tp-step")
    common = dict(family="encoder", vocab_size=97, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                  max_position_embeddings=32, head="classification", num_labels=3, hidden_dropout=0.0,
                  attention_dropout=0.0)
    export_hf(build_model(ModelConfig(num_layers=4, **common), seed=1), root / "teacher")
    export_hf(build_model(ModelConfig(num_layers=2, **common), seed=2), root / "student")
    return str(root / "teacher"), str(root / "student")


def test_distillation_step_tp2_equals_tp1(checkpoints):
    (ref,) = parallel.run_distributed(_step, 1, *checkpoints)
    tp2 = parallel.run_distributed(_step, 2, *checkpoints)
    assert {k for k in ref["terms"] if "/" not in k} == {"tinybert.hidden", "tinybert.attention", "tinybert.prediction", "kd.soft", "kd.hard"}
    assert any(ref["kinds"].values())  # some student parameters really are sharded at TP=2
    for rank in tp2:
        assert abs(rank["loss"] - ref["loss"]) <= TOL
        for k, v in ref["terms"].items():
            assert abs(rank["terms"][k] - v) <= TOL, k
        for name, g in ref["grads"].items():
            diff = (rank["grads"][name] - g).abs().max().item()
            assert diff <= TOL, f"{name}: {diff}"

