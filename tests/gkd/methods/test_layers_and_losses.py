from __future__ import annotations

import math

import pytest
import torch

from gkd.methods import losses
from gkd.methods.layers import hidden_tap, random_map, stride_map, uniform_map


def test_uniform_map():
    assert uniform_map(12, 6) == [0, 2, 4, 6, 8, 10, 12]
    assert uniform_map(24, 6) == [0, 4, 8, 12, 16, 20, 24]
    assert uniform_map(12, 5) == [0, 3, 6, 8, 10, 12]
    assert uniform_map(6, 3) == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        uniform_map(3, 4)


def test_stride_and_random_maps():
    assert stride_map(12, 5) == [0, 2, 4, 6, 8, 10]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    m = random_map(12, 4, g1)
    assert m == random_map(12, 4, g2)
    assert m[0] == 0 and m[-1] == 12 and m == sorted(m) and len(set(m)) == 5
    assert hidden_tap(0) == "embeddings" and hidden_tap(3) == "layers.2.output"


def test_masked_means_ignore_padding():
    s = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert losses.mse(s, t, mask).item() == pytest.approx((1 + 4) / 2)
    assert losses.mse(s, t).item() == pytest.approx((1 + 4 + 25 + 25) / 4)


def test_kl_soft_ce_and_cosine_match_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    tau = 2.0
    p_t = torch.softmax(t / tau, -1)
    expected_kl = (p_t * (p_t.log() - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    assert losses.kl_divergence(s, t, tau).item() == pytest.approx(expected_kl.item(), rel=1e-6)
    expected_ce = -(p_t * torch.log_softmax(s / tau, -1)).sum(-1).mean()
    assert losses.soft_cross_entropy(s, t, tau).item() == pytest.approx(expected_ce.item(), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert losses.cosine_distance(s, t).item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    probs_s, probs_t = torch.softmax(s, -1), torch.softmax(t, -1)
    assert losses.kl_between_distributions(probs_s, probs_t).item() == pytest.approx(
        losses.kl_divergence(s, t, 1.0).item(), rel=1e-5)


def test_task_loss_per_example():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0])
    per = losses.task_loss_per_example(logits, labels)
    assert per[0].item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)
    tok = torch.zeros(1, 3, 4)
    tok_labels = torch.tensor([[1, -100, 2]])
    assert losses.task_loss_per_example(tok, tok_labels).item() == pytest.approx(math.log(4), rel=1e-6)


def test_task_loss_is_one_mean_over_all_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4], [5, -100, -100, -100]])
    per_tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    keep = labels != -100
    assert losses.task_loss(logits, labels).item() == pytest.approx(per_tok[keep].mean().item(), rel=1e-6)
    per_example = losses.task_loss_per_example(logits, labels)
    assert per_example[0].item() == pytest.approx(per_tok[0].mean().item(), rel=1e-6)
    assert per_example[1].item() == pytest.approx(per_tok[1, 0].item(), rel=1e-6)
    # 5 labelled tokens: the per-example mean weights the lone token of example 1 four times as much
    assert per_example.mean().item() != pytest.approx(losses.task_loss(logits, labels).item(), rel=1e-3)
    cls = torch.randn(3, 4, generator=g)
    y = torch.tensor([0, 3, 1])
    assert losses.task_loss(cls, y).item() == pytest.approx(losses.task_loss_per_example(cls, y).mean().item())
    none = torch.full((2, 4), -100)
    assert losses.task_loss(logits, none).item() == 0.0


def test_soft_loss_and_logits_mask():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert losses.logits_mask(s, mask) is mask and losses.logits_mask(s[:, 0], mask) is None
    assert losses.soft_loss("kl", s, t, 2.0, mask).item() == pytest.approx(losses.kl_divergence(s, t, 2.0, mask).item())
    assert losses.soft_loss("ce", s, t, 2.0, mask).item() == pytest.approx(
        losses.soft_cross_entropy(s, t, 2.0, mask).item())
    assert losses.soft_loss("mse", s, t, 2.0, mask).item() == pytest.approx(losses.mse(s, t, mask).item())
    with pytest.raises(ValueError, match="unknown soft loss"):
        losses.soft_loss("l1", s, t)  # type: ignore[arg-type]


def test_attention_valid_mask_pairs_real_tokens_and_past_keys():
    mask = torch.tensor([[1, 1, 0]])
    valid = losses.attention_valid_mask(mask)
    assert valid.shape == (1, 1, 3, 3)
    assert valid[0, 0].tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    causal = losses.attention_valid_mask(mask, causal=True)
    assert causal[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    # the broadcasting rule: a [b, 1, s, s] mask selects pairs of every head of [b, heads, s, s] values
    scores = torch.arange(2 * 9, dtype=torch.float).reshape(1, 2, 3, 3)
    expected = scores[causal.expand_as(scores)].pow(2).mean()
    assert losses.mse(scores, torch.zeros_like(scores), causal).item() == pytest.approx(expected.item())


def test_importing_gkd_methods_loads_neither_torch_nor_megatron():
    import subprocess
    import sys

    code = ("import sys, gkd.methods as m; from gkd.methods import FeatureUse, MethodSpec, load_schema, hookimpl; "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, sorted(sys.modules); "
            "assert sorted(set(m.__all__) - set(m._EXPORTS)) == ['checks', 'layers', 'losses']; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_soft_loss_per_example_is_soft_loss_per_row_and_skips_padding(kind):
    from gkd.methods import soft_loss_per_example, summary_token

    assert soft_loss_per_example is losses.soft_loss_per_example and summary_token is losses.summary_token
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    per = losses.soft_loss_per_example(kind, s, t, 2.0)
    assert per.shape == (4,)
    assert per.mean().item() == pytest.approx(losses.soft_loss(kind, s, t, 2.0).item(), rel=1e-6)
    for b in range(4):
        assert per[b].item() == pytest.approx(losses.soft_loss(kind, s[b:b + 1], t[b:b + 1], 2.0).item(), rel=1e-5)
    tok_s, tok_t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_tok = losses.soft_loss_per_example(kind, tok_s, tok_t, 1.5, mask)
    assert per_tok[0].item() == pytest.approx(losses.soft_loss(kind, tok_s[:1, :2], tok_t[:1, :2], 1.5).item(), rel=1e-5)
    assert per_tok[1].item() == pytest.approx(losses.soft_loss(kind, tok_s[1:], tok_t[1:], 1.5).item(), rel=1e-5)
    garbage = tok_s.clone()
    garbage[0, 2] = 1e3
    assert losses.soft_loss_per_example(kind, garbage, tok_t, 1.5, mask)[0].item() == pytest.approx(
        per_tok[0].item(), rel=1e-6)
    assert losses.soft_loss_per_example(kind, tok_s, tok_t, 1.5, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown soft loss"):
        losses.soft_loss_per_example("l1", s, t)  # type: ignore[arg-type]


def test_summary_token_is_cls_for_encoders_and_the_last_real_token_for_decoders():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right padding, left padding
    assert torch.equal(losses.summary_token(hidden, mask, "encoder"), hidden[:, 0])
    assert torch.equal(losses.summary_token(hidden, mask, "decoder"), torch.stack([hidden[0, 2], hidden[1, 3]]))
