"""Feature taps: names, layouts, semantics, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gkd.models import LAYER_ROLES, build_model

ATTN = ("query", "key", "value", "scores", "probs", "context")


def _all_layer_features(i: int) -> set[str]:
    return {f"layers.{i}.{role}" for role in LAYER_ROLES}


def test_tap_names_per_family(encoder_cfg, decoder_cfg) -> None:
    enc = build_model(encoder_cfg(head="mlm"))
    names = enc.tap_names()
    assert len(names) == 1 + 2 * len(LAYER_ROLES) + 3
    assert names[0] == "embeddings" and names[-3:] == ["pooled", "logits", "logits.vocab_shard"]
    assert "final_norm" not in names
    dec = build_model(decoder_cfg())
    assert dec.tap_names()[-3:] == ["final_norm", "logits", "logits.vocab_shard"] and "pooled" not in dec.tap_names()
    base = build_model(encoder_cfg(head="none", add_pooler=False))
    assert "logits" not in base.tap_names() and "pooled" not in base.tap_names()
    assert "logits.vocab_shard" not in base.tap_names()
    assert "logits.vocab_shard" not in build_model(encoder_cfg(head="classification")).tap_names()


def test_unknown_names_raise_and_list_valid_ones(encoder_cfg) -> None:
    model = build_model(encoder_cfg())
    with pytest.raises(ValueError) as err, model.capture({"layers.2.output", "layers.0.hidden"}):
        pass
    msg = str(err.value)
    assert "['layers.0.hidden', 'layers.2.output']" in msg
    assert "layers.{0..1}" in msg and "attention.scores" in msg and "pooled" in msg and "'layers'" in msg
    with (
        pytest.raises(ValueError, match="unknown tap name"),
        model.capture(operations={"layer": lambda x: x}),
    ):
        pass
    with pytest.raises(TypeError, match="must be callable"), model.capture(operations={"embeddings": 3}):  # type: ignore[dict-item]
        pass


def test_encoder_layouts_and_semantics(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg(head="classification", num_labels=3)).eval()
    b = batch(100)
    B, S = b["input_ids"].shape
    names = {"embeddings", "pooled", "logits"} | _all_layer_features(0) | _all_layer_features(1)
    mlp_inputs: list[torch.Tensor] = []
    handle = model.layers[1].mlp.register_forward_pre_hook(lambda mod, args: mlp_inputs.append(args[0]))
    with torch.no_grad(), model.capture(names) as f:
        out = model(**b)
    handle.remove()
    assert set(f) == names
    for i in range(2):
        for role in ("input", "output"):
            assert f[f"layers.{i}.{role}"].shape == (B, S, 64)
        for role in ("query", "key", "value"):
            assert f[f"layers.{i}.attention.{role}"].shape == (B, 4, S, 16)
        assert f[f"layers.{i}.attention.scores"].shape == (B, 4, S, S)
        assert f[f"layers.{i}.attention.context"].shape == (B, S, 64)
        assert f[f"layers.{i}.ffn.intermediate"].shape == (B, S, 128)
    assert f["pooled"].shape == (B, 64) and f["logits"].shape == (B, 3)

    # The stack is wired as documented.
    torch.testing.assert_close(f["embeddings"], f["layers.0.input"], rtol=0, atol=0)
    torch.testing.assert_close(f["layers.0.output"], f["layers.1.input"], rtol=0, atol=0)
    torch.testing.assert_close(f["layers.1.output"], out.last_hidden, rtol=0, atol=0)
    torch.testing.assert_close(f["pooled"], out.pooled, rtol=0, atol=0)
    torch.testing.assert_close(f["logits"], out.logits, rtol=0, atol=0)

    # Attention: scaled, masked scores; probs = softmax(scores); context = probs @ v.
    q, k, v = (f[f"layers.0.attention.{r}"] for r in ("query", "key", "value"))
    scores, probs = f["layers.0.attention.scores"], f["layers.0.attention.probs"]
    pad = (b["attention_mask"] == 0)[:, None, None, :].expand_as(scores)
    expect = (q @ k.transpose(-1, -2)) / 4.0
    torch.testing.assert_close(scores[~pad], expect[~pad])
    assert bool((scores[pad] == torch.finfo(torch.float32).min).all())
    torch.testing.assert_close(probs, torch.softmax(scores, -1))
    assert float(probs[pad].abs().max()) == 0.0
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, S, 64)
    torch.testing.assert_close(f["layers.0.attention.context"], ctx)

    # ffn.intermediate is the activation output that feeds linear_fc2.
    fc1 = model.layers[1].mlp.linear_fc1
    x = mlp_inputs[0].transpose(0, 1)
    torch.testing.assert_close(f["layers.1.ffn.intermediate"], F.gelu(x @ fc1.weight.T + fc1.bias))


def test_decoder_gqa_rope_and_causality(decoder_cfg, batch) -> None:
    model = build_model(decoder_cfg()).eval()
    b = batch(128)
    B, S = b["input_ids"].shape
    names = {f"layers.1.attention.{r}" for r in ATTN} | {"final_norm", "logits", "layers.1.ffn.intermediate"}
    with torch.no_grad(), model.capture(names) as f:
        out = model(b["input_ids"], b["attention_mask"])
    q, k, v = (f[f"layers.1.attention.{r}"] for r in ("query", "key", "value"))
    assert q.shape == (B, 4, S, 16) and k.shape == (B, 2, S, 16) and v.shape == (B, 2, S, 16)
    assert f["layers.1.ffn.intermediate"].shape == (B, S, 96)
    assert out.logits.shape == (B, S, 128) and f["final_norm"].shape == (B, S, 64)
    torch.testing.assert_close(f["final_norm"], out.last_hidden, rtol=0, atol=0)
    # query/key are the post-RoPE tensors of the dot product; head j uses KV head j // 2.
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores, probs = f["layers.1.attention.scores"], f["layers.1.attention.probs"]
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    masked = causal | (b["attention_mask"] == 0)[:, None, None, :]
    torch.testing.assert_close(
        scores[~masked.expand_as(scores)], ((q @ k_rep.transpose(-1, -2)) / 4.0)[~masked.expand_as(scores)]
    )
    assert float(probs[..., causal].abs().max()) == 0.0
    ctx = (probs @ v_rep).permute(0, 2, 1, 3).reshape(B, S, 64)
    torch.testing.assert_close(f["layers.1.attention.context"], ctx)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_fused_and_explicit_attention_agree(family: str, encoder_cfg, decoder_cfg, batch) -> None:
    cfg = encoder_cfg(head="mlm") if family == "encoder" else decoder_cfg()
    model = build_model(cfg).eval()
    b = batch(cfg.vocab_size)
    kwargs = {"token_type_ids": b["token_type_ids"]} if family == "encoder" else {}
    plain = model(b["input_ids"], b["attention_mask"], **kwargs)
    with model.capture({"layers.0.attention.probs", "layers.1.attention.scores"}):
        explicit = model(b["input_ids"], b["attention_mask"], **kwargs)
    torch.testing.assert_close(explicit.logits, plain.logits, rtol=1e-5, atol=1e-5)
    with model.capture():
        empty = model(b["input_ids"], b["attention_mask"], **kwargs)
    torch.testing.assert_close(empty.logits, plain.logits, rtol=0, atol=0)


def test_features_keep_their_graph(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg(head="classification"))
    b = batch(100)
    with model.capture(
        {
            "layers.0.output",
            "layers.1.attention.probs",
            "layers.0.ffn.intermediate",
            "layers.1.attention.query",
        }
    ) as f:
        model(**b)
    loss = sum(t.square().mean() for t in f.values())
    loss.backward()
    qkv = model.layers[1].self_attention.linear_qkv.weight
    assert qkv.grad is not None and float(qkv.grad.abs().sum()) > 0
    assert float(model.embeddings.word_embeddings.weight.grad.abs().sum()) > 0
    assert model.classifier.weight.grad is None  # the classifier is not on any feature's path


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_gradients_with_respect_to_recorded_features(family: str, encoder_cfg, decoder_cfg, batch) -> None:
    """A recorded feature is on the pass's own path: d(loss)/d(feature) exists and equals the
    gradient taken through an operation that hands the pass a leaf at that point."""
    cfg = encoder_cfg(head="classification") if family == "encoder" else decoder_cfg()
    model = build_model(cfg, seed=5)
    b = batch(100)
    names = ["embeddings", "layers.0.output", "layers.1.attention.context", "layers.0.attention.value"]
    with model.capture(set(names)) as f:
        out = model(**b)
    grads = torch.autograd.grad(out.logits.square().mean(), [f[n] for n in names])
    for name, g in zip(names, grads, strict=True):
        assert g.shape == f[name].shape and float(g.abs().sum()) > 0, name
    leaf: dict[str, torch.Tensor] = {}

    def as_leaf(e: torch.Tensor) -> torch.Tensor:
        leaf["e"] = e.detach().requires_grad_(True)
        return leaf["e"]

    with model.capture(operations={"embeddings": as_leaf}):
        again = model(**b)
    (expected,) = torch.autograd.grad(again.logits.square().mean(), leaf["e"])
    torch.testing.assert_close(grads[0], expected)


def test_capture_is_single_use_and_does_not_nest(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)
    with model.capture({"layers.0.output"}) as f:
        with pytest.raises(RuntimeError, match="already pending"), model.capture({"embeddings"}):
            pass
        first = model(**b)
        recorded = f["layers.0.output"]
        model(b["input_ids"][:1])  # a second call in the block runs plain
        assert f["layers.0.output"] is recorded and len(f) == 1
    assert model._pending is None
    torch.testing.assert_close(model(**b).last_hidden, first.last_hidden, rtol=0, atol=0)


def test_attention_dropout_trains_in_both_paths(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg(attention_dropout=0.5)).train()
    b = batch(100)
    a = model(**b).last_hidden
    with model.capture({"layers.0.attention.probs"}) as f:
        c = model(**b).last_hidden
    assert not torch.allclose(a, c)  # different dropout masks
    model.eval()
    torch.testing.assert_close(model(**b).last_hidden, model(**b).last_hidden, rtol=0, atol=0)
    assert torch.isfinite(f["layers.0.attention.probs"]).all()
