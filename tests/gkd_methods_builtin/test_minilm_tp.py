"""MiniLM and MiniLMv2 under tensor parallelism: one distillation step at TP=2 equals TP=1 (loss,
every term, every student gradient), for an encoder and a GQA decoder pair, with MiniLMv2 both
on its local path (tp divides R) and on its gather path (R = 3)."""

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

TOL = 1e-6
# name in the step -> (registered method, config). hidden 48 / 4 heads: head size 12, queries 48
# wide, decoder keys/values 2·12 = 24 wide; R = 4 is local at TP=2, R = 3 is not (gathered).
METHODS = {
    "minilm": ("minilm", {"teacher_layer": 3}),
    "minilmv2": ("minilmv2", {"teacher_layer": -1, "relation_heads": 4}),
    "minilmv2_r3": ("minilmv2", {"teacher_layer": 3, "relation_heads": 3}),
}


def _batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    return {"input_ids": torch.randint(5, 90, (3, 9), generator=g) * mask, "attention_mask": mask}


def _step(root: str, family: str) -> dict[str, Any]:
    teacher = from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)
    student = from_pretrained(Path(root) / f"{family}-student").train()
    registry = load_plugin_manager().registry
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        "sequence_classification", "pretrain", parallel.tp_world_size())
    methods = {}
    for key, (name, config) in METHODS.items():
        spec = registry.get(name).spec
        methods[key] = SelectedMethod(spec.factory(apply_defaults(spec.config_schema, config), ctx), 1.0, {})
    contexts = {n: step_context(0, "s", 0, 0, 0, 10, n) for n in methods}
    result = distill_step({STUDENT: student, teacher_key("t"): teacher}, methods, contexts, _batch(family))
    result.loss.backward()
    grads = full_gradients(student)
    return {"loss": float(result.loss.detach()), "terms": {k: float(v.detach()) for k, v in result.terms.items()},
            "grads": grads}


def _both(root: str) -> dict[str, dict[str, Any]]:
    """One rank's results for both families (module level: the launcher imports it)."""
    return {family: _step(root, family) for family in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("minilm-tp")
    for family in ("encoder", "decoder"):
        common: dict[str, Any] = dict(family=family, vocab_size=97, hidden_size=48, num_attention_heads=4,
                                      ffn_hidden_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                                      attention_dropout=0.0)
        common |= (dict(head="classification", num_labels=3) if family == "encoder" else
                   dict(head="lm", num_kv_heads=2, hidden_act="silu", norm_eps=1e-6))
        export_hf(build_model(ModelConfig(num_layers=4, **common), seed=1), root / f"{family}-teacher")
        export_hf(build_model(ModelConfig(num_layers=2, **common), seed=2), root / f"{family}-student")
    return str(root)


def test_minilm_and_minilmv2_step_tp2_equals_tp1(checkpoints):
    reference = _both(checkpoints)  # TP=1 in this process
    ranks = parallel.run_distributed(_both, 2, checkpoints, tp=2, timeout_s=240)
    for family, ref in reference.items():
        assert set(ref["terms"]) == {"minilm.attention", "minilm.value", "minilmv2.query", "minilmv2.key",
                                     "minilmv2.value", "minilmv2_r3.query", "minilmv2_r3.key", "minilmv2_r3.value"}
        assert all(v > 1e-4 for v in ref["terms"].values()), ref["terms"]  # real, not trivially zero
        for rank in ranks:
            got = rank[family]
            assert abs(got["loss"] - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), family
            for k, v in ref["terms"].items():
                assert abs(got["terms"][k] - v) <= TOL * max(1.0, abs(v)), (family, k, got["terms"][k], v)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                diff = (got["grads"][name] - g).abs().max().item()
                assert diff <= TOL, f"{family} {name}: {diff}"
