"""ALP-KD, Universal-KD and CKD under tensor parallelism: one distillation step at TP=2 equals TP=1
(loss, every term, every student gradient and Universal-KD's projection gradients), for an
encoder and a GQA decoder pair. The three methods read only replicated hidden states (and
gathered logits), so they need no communication of their own: this test is the proof."""

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
GRAD_TOL = 1e-5  # relative to the largest entry: float32 sums reordered by the row-parallel all-reduce
METHODS = {  # one hard term in the step: the others leave it to ckd
    "alp-kd": {"pooling": "tokens", "alp_weight": 1.0, "hard_weight": 0},
    "universal-kd": {"layers": "all", "size": 8, "hard_weight": 0},
    "ckd": {"window_size": 5, "temperature": 2.0},
}
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


def _step(root: str, family: str) -> dict[str, Any]:
    teacher = from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)
    student = from_pretrained(Path(root) / f"{family}-student").train()
    registry = load_plugin_manager().registry
    ctx = MethodContext(model_shape(student.model_config), {"t": model_shape(teacher.model_config)},
                        TASK[family], "task", parallel.tp_world_size())
    methods = {}
    for name, config in METHODS.items():
        spec = registry.get(name).spec
        torch.manual_seed(0)  # Universal-KD's projections are replicated: the same init on every rank and TP size
        methods[name] = SelectedMethod(spec.factory(apply_defaults(spec.config_schema, config), ctx), 1.0, {})
    contexts = {n: step_context(0, "s", 0, 0, 0, 10, n) for n in methods}
    result = distill_step({STUDENT: student, teacher_key("t"): teacher}, methods, contexts, _batch(family))
    result.loss.backward()
    grads = full_gradients(student)
    grads |= {f"universal-kd.{n}": p.grad.clone() for n, p in methods["universal-kd"].method.named_parameters()}
    return {"loss": float(result.loss.detach()), "terms": {k: float(v.detach()) for k, v in result.terms.items()},
            "grads": grads}


def _both(root: str) -> dict[str, dict[str, Any]]:
    """One rank's results for both families (module level: the launcher imports it)."""
    return {family: _step(root, family) for family in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("alp-kd-tp")
    for family in ("encoder", "decoder"):
        common: dict[str, Any] = dict(family=family, vocab_size=97, hidden_size=32, num_attention_heads=4,
                                      ffn_hidden_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                                      attention_dropout=0.0, initializer_range=0.2)
        common |= (dict(head="classification", num_labels=3) if family == "encoder" else
                   dict(head="lm", num_kv_heads=2, hidden_act="silu", norm_eps=1e-6))
        export_hf(build_model(ModelConfig(num_layers=4, **common), seed=1), root / f"{family}-teacher")
        export_hf(build_model(ModelConfig(num_layers=2, **common), seed=2), root / f"{family}-student")
    return str(root)  # initializer_range 0.2: layers that change their input, so relations are well conditioned


def test_alp_kd_universal_kd_and_ckd_step_tp2_equals_tp1(checkpoints):
    reference = _both(checkpoints)  # TP=1 in this process
    ranks = parallel.run_distributed(_both, 2, checkpoints, tp=2, timeout_s=240)
    for family, ref in reference.items():
        assert set(ref["terms"]) == {"alp-kd.alp", "alp-kd.soft", "universal-kd.universal", "universal-kd.soft",
                                     "ckd.wr_dist", "ckd.wr_angle", "ckd.ltr_dist", "ckd.ltr_angle", "ckd.soft",
                                     "ckd.hard"}
        assert any(k.startswith("universal-kd.") for k in ref["grads"])
        for rank in ranks:
            got = rank[family]
            assert abs(got["loss"] - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), family
            for k, v in ref["terms"].items():
                assert abs(got["terms"][k] - v) <= TOL * max(1.0, abs(v)), (family, k, got["terms"][k], v)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                diff = (got["grads"][name] - g).abs().max().item()
                assert diff <= GRAD_TOL * max(1.0, g.abs().max().item()), f"{family} {name}: {diff}"
