"""Transformer layers and their megatron-core ``ModuleSpec``s.

Both families share one layer class, :class:`GkdTransformerLayer`, built from megatron
submodules (``SelfAttention`` with ``ColumnParallelLinear``/``RowParallelLinear``, ``MLP``,
torch norms through ``WrappedTorchNorm``). Only the placement of the two norms differs:

* ``norm_position="post"`` (BERT): ``x = LN(x + attn(x)); x = LN(x + mlp(x))`` — megatron's
  ``TransformerLayer`` is pre-norm only, hence the custom class;
* ``norm_position="pre"`` (Llama): ``x = x + attn(RMSNorm(x)); x = x + mlp(RMSNorm(x))``.

A decoder layer owns its rotary embedding (no parameters), so a layer taken from another
model runs correctly inside a foreign stack (the ``layers`` operation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from gkd.models.attention import TappedCoreAttention
from gkd.models.taps import Layout, tap_in_layer

NormPosition = Literal["pre", "post"]


class FfnOutputLinear(RowParallelLinear):
    """``linear_fc2`` of the MLP; its input is the ``ffn.intermediate`` tap point."""

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward(tap_in_layer("ffn.intermediate", input_, Layout.SBH), *args, **kwargs)


@dataclass
class GkdLayerSubmodules:
    """Submodule specs of :class:`GkdTransformerLayer`."""

    attention_norm: ModuleSpec | type
    """Norm after (post) or before (pre) the attention block."""
    self_attention: ModuleSpec | type
    mlp_norm: ModuleSpec | type
    """Norm after (post) or before (pre) the MLP block."""
    mlp: ModuleSpec | type


class GkdTransformerLayer(MegatronModule):
    """One transformer layer on ``[s, b, h]`` hidden states.

    Args:
        config: megatron ``TransformerConfig``.
        submodules: :class:`GkdLayerSubmodules`.
        layer_number: 1-based index (megatron convention).
        norm_position: ``"post"`` (BERT) or ``"pre"`` (Llama).
        rotary_base: RoPE base; ``None`` disables RoPE.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: GkdLayerSubmodules,
        layer_number: int = 1,
        norm_position: NormPosition = "pre",
        rotary_base: float | None = None,
    ) -> None:
        super().__init__(config=config)
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position ({norm_position!r}) must be 'pre' or 'post'")
        self.layer_number = layer_number
        self.norm_position = norm_position
        self.hidden_dropout = config.hidden_dropout
        norm_kw = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.attention_norm = build_module(submodules.attention_norm, **norm_kw)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.mlp_norm = build_module(submodules.mlp_norm, **norm_kw)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)
        self.rotary = (
            RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=rotary_base,
                use_cpu_initialization=True,
            )
            if rotary_base is not None
            else None
        )

    def _residual(self, branch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        out, bias = branch
        if bias is not None:
            out = out + bias
        return F.dropout(out, p=self.hidden_dropout, training=self.training)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the layer.

        Args:
            hidden_states: ``[s, b, h]``.
            attention_mask: Boolean, True = masked, broadcastable to ``[b, 1, s, s]``.

        Returns:
            ``[s, b, h]``.
        """
        rope = self.rotary(hidden_states.size(0)) if self.rotary is not None else None
        x = hidden_states
        if self.norm_position == "post":
            x = self.attention_norm(x + self._residual(self.self_attention(x, attention_mask)))
            return self.mlp_norm(x + self._residual(self.mlp(x)))
        x = x + self._residual(
            self.self_attention(self.attention_norm(x), attention_mask, rotary_pos_emb=rope)
        )
        return x + self._residual(self.mlp(self.mlp_norm(x)))


def _self_attention_spec(mask_type: AttnMaskType) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=TappedCoreAttention,
            linear_proj=RowParallelLinear,
        ),
    )


_MLP_SPEC = ModuleSpec(
    module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=FfnOutputLinear)
)


def get_encoder_layer_spec() -> ModuleSpec:
    """BERT layer: post-LayerNorm, bidirectional attention, biased GELU MLP."""
    return ModuleSpec(
        module=GkdTransformerLayer,
        params={"norm_position": "post"},
        submodules=GkdLayerSubmodules(
            attention_norm=WrappedTorchNorm,
            self_attention=_self_attention_spec(AttnMaskType.padding),
            mlp_norm=WrappedTorchNorm,
            mlp=_MLP_SPEC,
        ),
    )


def get_decoder_layer_spec(rotary_base: float) -> ModuleSpec:
    """Llama layer: pre-RMSNorm, causal attention with RoPE and GQA, SwiGLU MLP, no biases."""
    return ModuleSpec(
        module=GkdTransformerLayer,
        params={"norm_position": "pre", "rotary_base": rotary_base},
        submodules=GkdLayerSubmodules(
            attention_norm=WrappedTorchNorm,
            self_attention=_self_attention_spec(AttnMaskType.causal),
            mlp_norm=WrappedTorchNorm,
            mlp=_MLP_SPEC,
        ),
    )


__all__ = [
    "FfnOutputLinear",
    "GkdLayerSubmodules",
    "GkdTransformerLayer",
    "NormPosition",
    "get_decoder_layer_spec",
    "get_encoder_layer_spec",
]
