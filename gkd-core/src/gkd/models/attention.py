"""Core attention with feature taps (the ``core_attention`` of megatron's ``SelfAttention``).

megatron's ``DotProductAttention`` always materialises the ``[b, heads, s, s]`` probabilities
and uses a -10000 mask fill. This module instead

* taps ``attention.query|key|value`` (after RoPE, i.e. the tensors in the dot product),
* runs ``torch.nn.functional.scaled_dot_product_attention`` when neither ``attention.scores``
  nor ``attention.probs`` of the running layer is requested — on CPU that is the fused flash
  kernel, which keeps no per-head ``s × s`` tensor for backward —
* and otherwise computes the scores explicitly (HF "eager" semantics: masked entries are
  ``torch.finfo(dtype).min``, so fully masked rows give uniform probabilities, never NaN).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from gkd.models.taps import Layout, tap_in_layer, wants_in_layer


class TappedCoreAttention(MegatronModule):
    """Scaled dot-product attention over this rank's heads, with gkd taps.

    Inputs follow megatron: query ``[s, b, heads_local, d]``, key/value
    ``[s, b, kv_heads_local, d]``, ``attention_mask`` boolean, True = masked out, broadcastable
    to ``[b, 1, s, s]`` (gkd passes the key-padding mask ``[b, 1, 1, s]``; the causal part is
    added here for causal layers). Output ``[s, b, heads_local * d]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("gkd attention does not support context parallelism")
        tp = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.heads_local = divide(config.num_attention_heads, tp)
        self.kv_heads_local = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        self.causal = attn_mask_type == AttnMaskType.causal
        self.dropout_p = config.attention_dropout
        self.softmax_in_fp32 = config.attention_softmax_in_fp32

    def _full_mask(
        self, mask: torch.Tensor | None, sq: int, sk: int, device: torch.device
    ) -> torch.Tensor | None:
        if not self.causal:
            return mask
        causal = torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(1)
        return causal if mask is None else (mask | causal)

    def _dropout_rng(self) -> contextlib.AbstractContextManager[Any]:
        # As megatron's DotProductAttention: dropout on head-sharded probabilities draws from
        # the per-TP-rank stream so different ranks (= different heads) get different masks.
        if self.training and self.dropout_p > 0:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """Scores and probabilities as tensors (the taps need them)."""
        if self.kv_heads_local != self.heads_local:
            rep = self.heads_local // self.kv_heads_local
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        mask = self._full_mask(padding, q.size(2), k.size(2), q.device)
        if mask is not None:
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        scores = tap_in_layer("attention.scores", scores, Layout.PUBLIC)
        if self.softmax_in_fp32 and scores.dtype != torch.float32:
            probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        probs = tap_in_layer("attention.probs", probs, Layout.PUBLIC)
        with self._dropout_rng():
            probs = F.dropout(probs, p=self.dropout_p, training=self.training)
        return torch.matmul(probs, v)

    def _fused(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """``scaled_dot_product_attention``: no per-head ``s × s`` tensor is kept."""
        # Causal without padding: the kernel builds the triangle itself (no mask tensor at all).
        causal_flag = self.causal and padding is None and q.size(2) == k.size(2)
        mask = None if causal_flag else self._full_mask(padding, q.size(2), k.size(2), q.device)
        additive = None
        if mask is not None:
            # Additive finite mask (not boolean): rows with every key masked stay finite.
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            additive.masked_fill_(mask, torch.finfo(q.dtype).min)
        with self._dropout_rng():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=additive,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=causal_flag,
                scale=self.scale,
                enable_gqa=self.kv_heads_local != self.heads_local,
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("gkd attention supports neither attention_bias nor packed sequences")
        query = tap_in_layer("attention.query", query, Layout.SBND)
        key = tap_in_layer("attention.key", key, Layout.SBND)
        value = tap_in_layer("attention.value", value, Layout.SBND)
        sq, b = query.shape[:2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, d]
        v = value.permute(1, 2, 0, 3)
        if wants_in_layer("attention.scores") or wants_in_layer("attention.probs"):
            context = self._explicit(q, k, v, attention_mask)
        else:
            context = self._fused(q, k, v, attention_mask)
        context = context.permute(2, 0, 1, 3).reshape(sq, b, self.heads_local * self.head_dim)
        return tap_in_layer("attention.context", context, Layout.SBH)


__all__ = ["TappedCoreAttention"]
