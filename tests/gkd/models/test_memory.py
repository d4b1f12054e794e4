"""A forward pass materialises only the requested features (measured in bytes)."""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Iterable

import pytest
import torch

from gkd.models import GkdModel, build_model

B, S, H, HEADS = 3, 10, 64, 4


def _storage_bytes(tensors: Iterable[torch.Tensor | None], exclude: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views count once), minus ``exclude``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _pass(model: GkdModel, b: dict[str, torch.Tensor], features: set[str] | None, grad: bool):
    """Run one forward; return (tensors saved for backward, outputs, recorded features)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(grad):
        if features is None:
            out, feats = model(**b), {}
        else:
            with model.capture(features) as feats:
                out = model(**b)
    return saved, [out.logits, out.last_hidden, out.pooled], dict(feats)


@pytest.fixture
def setup(encoder_cfg, batch):
    model = build_model(encoder_cfg(head="classification", num_labels=3)).eval()
    b = batch(100, b=B, s=S)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return model, b, params


def test_no_grad_pass_keeps_exactly_the_requested_tensors(setup) -> None:
    model, b, params = setup
    _, outs, _ = _pass(model, b, None, grad=False)
    base = _storage_bytes(outs, params)
    _, outs, feats = _pass(model, b, set(), grad=False)
    assert feats == {} and _storage_bytes(outs, params) == base

    _, outs, feats = _pass(model, b, {"layers.0.output"}, grad=False)
    assert list(feats) == ["layers.0.output"]
    extra = _storage_bytes([*outs, *feats.values()], params) - base
    assert extra == B * S * H * 4  # exactly one [b, s, h] fp32 tensor

    _, outs, feats = _pass(model, b, {"layers.1.attention.probs"}, grad=False)
    extra = _storage_bytes([*outs, *feats.values()], params) - base
    assert extra == B * HEADS * S * S * 4  # exactly one [b, heads, s, s] fp32 tensor


def test_grad_pass_stores_no_attention_matrix_unless_asked(setup) -> None:
    model, b, params = setup
    attn_shape = (B, HEADS, S, S)

    saved_plain, outs_plain, _ = _pass(model, b, None, grad=True)
    plain_shapes = Counter(tuple(t.shape) for t in saved_plain)
    plain_bytes = _storage_bytes([*saved_plain, *outs_plain], params)
    assert attn_shape not in plain_shapes  # the fused kernel keeps no per-head s×s tensor

    for request in (set(), {"layers.1.output"}, {"layers.0.output", "layers.0.input"}):
        saved, outs, feats = _pass(model, b, request, grad=True)
        assert Counter(tuple(t.shape) for t in saved) == plain_shapes, request
        added = _storage_bytes([*saved, *outs, *feats.values()], params) - plain_bytes
        # Hidden states are already alive for backward; a feature can add at most itself.
        assert 0 <= added <= sum(t.numel() * t.element_size() for t in feats.values()), (request, added)

    saved, _, feats = _pass(model, b, {"layers.1.attention.probs"}, grad=True)
    shapes = Counter(tuple(t.shape) for t in saved)
    assert shapes[attn_shape] >= 1 and feats["layers.1.attention.probs"].requires_grad


def test_features_are_released_with_the_dict(setup) -> None:
    model, b, _ = setup
    with torch.no_grad(), model.capture({"layers.0.output", "layers.1.attention.scores"}) as feats:
        model(**b)
    refs = [weakref.ref(t) for t in feats.values()]
    del feats
    gc.collect()
    assert all(r() is None for r in refs)  # neither the model nor the session holds them
    assert model._pending is None
