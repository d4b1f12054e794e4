from __future__ import annotations

import math

import pytest
import torch

from gkd.methods import GkdError, MethodContext, ModelView, check_features
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
from gkd_methods_builtin.minilm import SPEC

B, H, L, DS, DT = 3, 4, 6, 8, 16
FILL = torch.finfo(torch.float32).min


def _method(family="encoder", **config):
    return build_method("minilm", config, student=shape(family, num_layers=2, hidden_size=H * DS),
                        teachers={"t": shape(family, num_layers=4, hidden_size=H * DT)})


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


def _features(mask: torch.Tensor, causal: bool, seed: int = 0):
    """Scores with the model's fill at masked keys, and values; student layer 1, teacher layer 3."""
    g = torch.Generator().manual_seed(seed)
    keys = mask.bool()[:, None, None, :].expand(B, H, L, L)
    if causal:
        keys = keys & torch.ones(L, L, dtype=torch.bool).tril()
    s_scores = torch.randn(B, H, L, L, generator=g).masked_fill(~keys, FILL)
    t_scores = (2 * torch.randn(B, H, L, L, generator=g)).masked_fill(~keys, FILL)
    s_v, t_v = torch.randn(B, H, L, DS, generator=g), torch.randn(B, H, L, DT, generator=g)
    s = {"layers.1.attention.scores": s_scores, "layers.1.attention.value": s_v}
    t = {"layers.3.attention.scores": t_scores, "layers.3.attention.value": t_v}
    return s, t


def _kl_rows(t_rel: torch.Tensor, s_rel: torch.Tensor, n: int, causal: bool) -> list[torch.Tensor]:
    """KL(teacher row ‖ student row) of every real query row of one head, keys restricted to the
    real (and, causal, past) positions; t_rel/s_rel are raw [L, L] logits."""
    out = []
    for q in range(n):
        k = q + 1 if causal else n
        p, r = torch.softmax(t_rel[q, :k], -1), torch.softmax(s_rel[q, :k], -1)
        out.append((p * (p.log() - r.log())).sum())
    return out


def _expected(s, t, mask, causal):
    """MiniLM's L_AT and L_VR by hand: mean over heads and real query positions of each KL."""
    att, val = [], []
    for b in range(B):
        n = int(mask[b].sum())
        for h in range(H):
            att += _kl_rows(t["layers.3.attention.scores"][b, h], s["layers.1.attention.scores"][b, h], n, causal)
            vs, vt = s["layers.1.attention.value"][b, h], t["layers.3.attention.value"][b, h]
            val += _kl_rows(vt @ vt.T / math.sqrt(DT), vs @ vs.T / math.sqrt(DS), n, causal)
    return torch.stack(att).mean().item(), torch.stack(val).mean().item()


@pytest.mark.parametrize(("family", "padded"), [("encoder", False), ("encoder", True), ("decoder", True)])
def test_loss_matches_the_paper(family, padded):
    causal = family == "decoder"
    mask = _mask() if padded else torch.ones(B, L, dtype=torch.long)
    s, t = _features(mask, causal)
    m = _method(family, value_weight=0.5)
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(s, None), {"t": ModelView(t, None)}))
    att, val = _expected(s, t, mask, causal)
    assert terms["attention"].item() == pytest.approx(att, rel=1e-5)
    assert terms["value"].item() == pytest.approx(0.5 * val, rel=1e-5)
    # Not the reference's softmax over probabilities: that gives another (much smaller) value.
    s_probs, t_probs = torch.softmax(s["layers.1.attention.scores"], -1), torch.softmax(t["layers.3.attention.scores"], -1)
    bug = torch.nn.functional.kl_div(torch.log_softmax(s_probs, -1), torch.log_softmax(t_probs, -1),
                                     log_target=True, reduction="none").sum(-1).mean()
    assert abs(terms["attention"].item() - bug.item()) > 0.1


def test_masked_positions_do_not_matter():
    mask = _mask()
    for family in ("encoder", "decoder"):
        s, t = _features(mask, family == "decoder")
        m = _method(family)
        before = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(s, None), {"t": ModelView(t, None)}))
        g = torch.Generator().manual_seed(5)
        for feats in (s, t):  # scribble over padded queries/keys (and the future for decoders)
            for k, x in feats.items():
                keep = mask.bool()[:, None, :, None]
                if k.endswith("scores"):
                    keep = keep & mask.bool()[:, None, None, :]
                    if family == "decoder":
                        keep = keep & torch.ones(L, L, dtype=torch.bool).tril()
                feats[k] = torch.where(keep, x, 1e4 * torch.randn(x.shape, generator=g))
        after = m.loss(step(), {}, 0, outputs({"attention_mask": mask}, ModelView(s, None), {"t": ModelView(t, None)}))
        assert all(torch.isfinite(v) for v in after.values())
        assert after["attention"].item() == pytest.approx(before["attention"].item(), rel=1e-6)
        # Values of padded tokens relate to nobody and are related to by nobody.
        assert after["value"].item() == pytest.approx(before["value"].item(), rel=1e-6)


def test_plan_reads_the_last_student_layer_and_teacher_layer():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"layers.1.attention.scores", "layers.1.attention.value"}
    assert plan.models["teacher:t"].features == {"layers.3.attention.scores", "layers.3.attention.value"}
    assert m.plan(step(), {}, 1, None) is None
    m = _method(teacher_layer=2, value_weight=0)
    assert m.plan(step(), {}, 0, None).models["teacher:t"].features == {"layers.1.attention.scores"}
    m = _method(teacher_layer=-2, attention_weight=0)
    assert m.plan(step(), {}, 0, None).models["teacher:t"].features == {"layers.2.attention.value"}


def test_shape_rules_name_the_field_and_models():
    ctx = MethodContext(shape(num_attention_heads=2), {"t": shape(num_attention_heads=4)}, "sequence_classification", "pretrain")
    issues = check_features(SPEC, {}, ctx)
    assert [(i.field, i.model) for i in issues] == [("attention_weight", "teacher 't'"), ("value_weight", "teacher 't'")]
    assert issues[0].message.startswith("minilm: the attention transfer compares heads one to one, but the student "
                                        "has 2 heads and teacher 't' 4")
    gqa = MethodContext(shape("decoder", num_kv_heads=2), {"t": shape("decoder", num_kv_heads=4)}, "causal_lm", "task")
    (issue,) = check_features(SPEC, {}, gqa)
    assert issue.field == "value_weight" and "key/value heads" in issue.message
    assert check_features(SPEC, {"value_weight": 0}, gqa) == []
    (issue,) = check_features(SPEC, {"teacher_layer": 5}, MethodContext(shape(), {"t": shape()}, "masked_lm", "pretrain"))
    assert issue.field == "teacher_layer" and "teacher 't' has 4 layers" in issue.message
    (issue,) = check_features(SPEC, {"attention_weight": 0, "value_weight": 0},
                              MethodContext(shape(), {"t": shape()}, "masked_lm", "pretrain"))
    assert issue.field == "attention_weight" and "nothing is distilled" in issue.message
    with pytest.raises(GkdError, match="compares heads one to one"):
        build_method("minilm", {}, student=shape(num_attention_heads=2), teachers={"t": shape(num_attention_heads=4)}, check=False)
    with pytest.raises(GkdError, match=r"config\.teacher_layer: minilm: teacher_layer is 0"):
        build_method("minilm", {"teacher_layer": 0})


def test_terms_decrease_on_tiny_models():
    models = tiny_models("encoder")
    method = build_method("minilm", models=models)
    batch = tiny_batch("encoder")
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(15):
        opt.zero_grad()
        result = run_step(method, models, batch, iteration=i, total=15)
        result.loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in result.terms.items()})
    for term in ("minilm.attention", "minilm.value"):
        assert history[-1][term] < 0.7 * history[0][term], (term, history[0][term], history[-1][term])


@pytest.mark.parametrize(("family", "config"), [
    ("encoder", {}),
    ("encoder", {"teacher_layer": 2, "value_weight": 0}),
    ("decoder", {}),
])
def test_conformance(family, config):
    check_conformance("minilm", config, family=family)


def test_attention_kl_on_probabilities_equals_log_space_with_finite_gradients():
    from gkd.methods import losses

    mask = _mask()
    valid = losses.attention_valid_mask(mask, causal=True)
    s, t = _features(mask, causal=True)
    s_scores = s["layers.1.attention.scores"].requires_grad_(True)
    t_scores = t["layers.3.attention.scores"]
    in_log = losses.attention_kl(losses.masked_log_softmax(s_scores, valid), losses.masked_log_softmax(t_scores, valid),
                                 valid, log_probs=True)
    in_probs = losses.attention_kl(torch.softmax(s_scores, -1), torch.softmax(t_scores, -1), valid)
    assert in_probs.item() == pytest.approx(in_log.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(in_probs + in_log, s_scores)
    assert torch.isfinite(grad).all()
    assert grad[2, :, 2:].abs().max() == 0  # padded query rows take no part
