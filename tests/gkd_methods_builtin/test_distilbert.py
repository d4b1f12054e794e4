from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
from gkd_methods_builtin.distilbert import SPEC

B, L, H, V = 3, 6, 16, 11


def _method(config=None, family="encoder", task="masked_lm"):
    head = "mlm" if task == "masked_lm" else None
    return build_method("distilbert", config, student=shape(family, num_layers=2, hidden_size=H, head=head),
                        teachers={"t": shape(family, num_layers=4, hidden_size=H, head=head)}, task=task,
                        stage_kind="pretrain")


def _inputs(gen):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, 4:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[1, 0], labels[1, 3], labels[2, 2] = 5, 7, 1, 3  # masked positions
    hs, ht = torch.randn(B, L, H, generator=gen), torch.randn(B, L, H, generator=gen)
    z, zt = torch.randn(B, L, V, generator=gen), torch.randn(B, L, V, generator=gen)
    return {"attention_mask": mask, "labels": labels}, hs, ht, z, zt


def _view(batch, hs, ht, z, zt):
    return outputs(batch, ModelView({"layers.1.output": hs}, z), {"t": ModelView({"layers.3.output": ht}, zt)})


def _kl(z, zt, tau):
    p = torch.softmax(zt / tau, -1)
    return tau**2 * (p * (p.log() - torch.log_softmax(z / tau, -1))).sum(-1)


def test_plan_reads_the_last_hidden_states():
    m = _method()
    plan = m.plan(step(), {}, 0, None)
    assert plan.models["student"].features == {"layers.1.output"}
    assert plan.models["teacher:t"].features == {"layers.3.output"}
    assert m.plan(step(), {}, 1, None) is None
    assert set(_method({"cos_weight": 0, "soft_weight": 0}).plan(step(), {}, 0, None).models) == {"student"}


def test_loss_matches_formula_on_masked_positions():
    batch, hs, ht, z, zt = _inputs(torch.Generator().manual_seed(0))
    m = _method({"temperature": 2.0, "soft_weight": 5.0, "hard_weight": 2.0, "cos_weight": 1.5})
    terms = m.loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    labelled = batch["labels"] != -100
    assert terms["soft"].item() == pytest.approx(5.0 * _kl(z, zt, 2.0)[labelled].mean().item(), rel=1e-5)
    cos = 1 - F.cosine_similarity(hs, ht, dim=-1)
    assert terms["cos"].item() == pytest.approx(1.5 * cos[labelled].mean().item(), rel=1e-5)
    mlm = F.cross_entropy(z[labelled], batch["labels"][labelled])
    assert terms["hard"].item() == pytest.approx(2.0 * mlm.item(), rel=1e-5)


def test_tokens_masks_average_over_every_real_token_only():
    batch, hs, ht, z, zt = _inputs(torch.Generator().manual_seed(1))
    hs[2, 4:] = 0.0  # padded rows: must not count as distance 1 (the reference's constant-1 rows)
    m = _method({"soft_mask": "tokens", "cos_mask": "tokens", "hard_weight": 0})
    terms = m.loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    keep = batch["attention_mask"].bool()
    assert set(terms) == {"soft", "cos"}
    assert terms["soft"].item() == pytest.approx(_kl(z, zt, 1.0)[keep].mean().item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx((1 - F.cosine_similarity(hs, ht, dim=-1))[keep].mean().item(), rel=1e-5)


def test_decoder_labelled_positions_are_the_next_token_positions():
    batch, hs, ht, z, zt = _inputs(torch.Generator().manual_seed(2))
    mask = batch["attention_mask"]
    labels = torch.full((B, L), -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), 1, -100)  # shifted causal labels
    batch["labels"] = labels
    m = _method(family="decoder", task="causal_lm")
    terms = m.loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    valid = labels != -100
    assert terms["soft"].item() == pytest.approx(_kl(z, zt, 1.0)[valid].mean().item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx((1 - F.cosine_similarity(hs, ht, dim=-1))[valid].mean().item(), rel=1e-5)


def test_task_stage_uses_the_task_logits_and_every_real_token():
    g = torch.Generator().manual_seed(3)
    batch, hs, ht, _, _ = _inputs(g)
    z, zt = torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g)
    batch["labels"] = torch.tensor([0, 3, 2])
    m = build_method("distilbert", {"temperature": 3.0}, student=shape(num_layers=2, hidden_size=H),
                     teachers={"t": shape(num_layers=4, hidden_size=H)})
    terms = m.loss(step(), {}, 0, _view(batch, hs, ht, z, zt))
    keep = batch["attention_mask"].bool()
    assert terms["soft"].item() == pytest.approx(_kl(z, zt, 3.0).mean().item(), rel=1e-5)
    assert terms["hard"].item() == pytest.approx(F.cross_entropy(z, batch["labels"]).item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx((1 - F.cosine_similarity(hs, ht, dim=-1))[keep].mean().item(), rel=1e-5)


def test_checks_reject_unequal_widths_and_a_headless_teacher():
    ctx = MethodContext(shape(num_layers=2, hidden_size=16), {"t": shape(hidden_size=32)}, "sequence_classification",
                        "task")
    (issue,) = check_features(SPEC, {}, ctx)
    assert issue.field == "cos_weight" and issue.model == "teacher 't'"
    assert issue.message.startswith("distilbert: the cosine term compares hidden states of equal width, but the "
                                    "student has hidden_size 16 and teacher 't' 32")
    assert check_features(SPEC, {"cos_weight": 0}, ctx) == []
    with pytest.raises(GkdError, match="equal width"):
        build_method("distilbert", {}, student=shape(num_layers=2, hidden_size=16),
                     teachers={"t": shape(hidden_size=32)}, check=False)
    headless = MethodContext(shape(num_layers=2), {"t": shape(head="none")}, "masked_lm", "pretrain")
    (issue,) = check_features(SPEC, {}, headless)
    assert issue.field == "soft_weight" and "fine-tune it first" in issue.message
    assert SPEC.factory.exclusive({"hard_weight": 2.0}) == {"hard_loss": "hard_weight"}
    assert SPEC.factory.exclusive({"hard_weight": 0}) == {}


@pytest.mark.parametrize(("family", "task", "config"), [
    ("encoder", "masked_lm", None),
    ("encoder", "masked_lm", {"soft_mask": "tokens", "cos_mask": "tokens", "temperature": 2.0}),
    ("encoder", None, None),
    ("decoder", None, None),
])
def test_distilbert_conformance(family, task, config):
    report = check_conformance("distilbert", config, family=family, task=task)
    assert set(report.terms[0]) == {"soft", "hard", "cos"}


@pytest.mark.parametrize(("family", "task"), [("encoder", "masked_lm"), ("decoder", "causal_lm")])
def test_distilbert_terms_decrease_on_tiny_models(family, task):
    models = tiny_models(family, task=task, student_layers=2, teacher_layers=4)
    # no hard term: the tiny teacher's random weights disagree with the batch's labels
    m = build_method("distilbert", {"cos_mask": "tokens", "soft_mask": "tokens", "hard_weight": 0}, models=models,
                     task=task, stage_kind="pretrain")
    batch = tiny_batch(family, task)
    opt = torch.optim.Adam(models["student"].parameters(), lr=3e-3)
    history = []
    for i in range(15):
        result = run_step(m, models, batch, iteration=i, total=15)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in result.terms.items()})
    for term in ("distilbert.soft", "distilbert.cos"):
        assert history[-1][term] < 0.8 * history[0][term], (term, history[0][term], history[-1][term])
