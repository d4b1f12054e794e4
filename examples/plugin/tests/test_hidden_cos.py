from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.methods import GkdError, ModelView
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

STUDENT, TEACHER = shape(num_layers=2, hidden_size=16), shape(num_layers=4, hidden_size=32)


def make(config=None):
    return build_method("hidden-cos", config, student=STUDENT, teachers={"t": TEACHER})


def batch(b=3, s=5):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 3:] = 0  # padding in the first example
    return {"input_ids": torch.zeros(b, s, dtype=torch.long), "attention_mask": mask,
            "labels": torch.tensor([0, 2, 1])}


def test_plan_requests_only_the_chosen_hidden_states():
    m, state = build_method("hidden-cos", {"teacher_layer": 2}, student=STUDENT, teachers={"t": TEACHER},
                            with_state=True)
    plan = m.plan(step(), state, 0, None)
    assert plan.models["student"].features == {"layers.1.output"}
    assert plan.models["teacher:t"].features == {"layers.1.output"}
    assert m.plan(step(), state, 1, None) is None


def test_loss_matches_formula_and_skips_padding():
    m = make({"hard_weight": 0.5})
    g = torch.Generator().manual_seed(0)
    hs, ht, z = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(3, 3, generator=g)
    b = batch()
    # outputs() computes task_loss from z and the labels with the engine's function
    out = outputs(b, ModelView({"layers.1.output": hs}, z), {"t": ModelView({"layers.3.output": ht}, None)})
    terms = m.loss(step(), {}, 0, out)
    cos = F.cosine_similarity(m.proj(hs), ht, dim=-1)
    keep = b["attention_mask"].bool()
    assert terms["cos"].item() == pytest.approx((1 - cos)[keep].mean().item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(0.5 * F.cross_entropy(z, b["labels"]).item(), rel=1e-6)
    terms["cos"].backward()
    assert m.proj.weight.grad is not None  # the projection is trained


def test_warmup_scales_the_cosine_term():
    m = make({"warmup": 0.5, "hard_weight": 0})
    out = outputs(batch(), ModelView({"layers.1.output": torch.randn(3, 5, 16)}, torch.zeros(3, 3)),
                  {"t": ModelView({"layers.3.output": torch.randn(3, 5, 32)}, None)})
    full = m.loss(step(iteration=5, total=10), {}, 0, out)["cos"]
    half = m.loss(step(iteration=25, total=100), {}, 0, out)["cos"]
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-5)


def test_a_teacher_layer_beyond_the_teacher_is_a_config_error():
    with pytest.raises(GkdError, match=r"config\.teacher_layer: hidden-cos: teacher_layer is 5, but teacher 't' has 4"):
        make({"teacher_layer": 5})
    with pytest.raises(GkdError, match=r"config\.warmup: 2 is greater than the maximum of 1"):
        make({"warmup": 2})


def test_one_real_step_on_tiny_models():
    models = tiny_models("encoder", student_hidden_size=16)  # student 2 layers, teacher 't' 4 layers
    method = build_method("hidden-cos", models=models)
    result = run_step(method, models, tiny_batch("encoder"))
    assert set(result.terms) == {"hidden-cos.cos", "hidden-cos.hard"}
    result.loss.backward()
    assert method.proj.weight.grad is not None


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_conformance(family):
    check_conformance("hidden-cos", {"warmup": 0.1, "teacher_layer": 3}, family=family)
