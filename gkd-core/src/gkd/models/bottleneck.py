"""MobileBERT's inverted-bottleneck (IB) encoder: embeddings, layer and its ``ModuleSpec``.

Selected by ``ModelConfig(variant="mobilebert", ...)`` (family ``encoder``); the options
mirror transformers' ``MobileBertConfig``. The residual stream between layers has
``hidden_size`` (``h``); attention and FFNs run at the "true hidden size" ``t``
(``intra_bottleneck_size`` with ``use_bottleneck``, else ``h``). One layer, on ``[s, b, h]``::

    x_in  = norm(bottleneck_input(h_in))                      # [s, b, t] residual of the attention
    q = k = norm(bottleneck_attention(h_in))                  # key_query_shared_bottleneck
    v     = h_in                                              # (x_in with use_bottleneck_attention)
    a     = attention_norm(linear_proj(attn(q, k, v)) + x_in)
    a     = ffn_norms[j](ffn_j(a) + a)   for j < num_feedforward_networks - 1
    m     = mlp_norm(mlp(a) + a)                              # the final FFN: ffn.intermediate tap
    h_out = output_norm(dropout(output_bottleneck(m)) + h_in) # [s, b, h]

Norms are ``NoNorm`` (``x·w + b``) or LayerNorm (``normalization_type``). Tensor
parallelism as in the standard layers: query/key/value and ``linear_fc1`` are
``ColumnParallelLinear`` (split by heads / FFN columns), ``linear_proj`` and ``linear_fc2``
``RowParallelLinear``; the bottleneck projections and norms (full width, needed by the
norms) are replicated. Attention is :class:`~gkd.models.attention.TappedCoreAttention`, so
``attention.query|key|value|scores|probs|context`` taps (at the true hidden size) and the
fused/explicit switch work as for BERT.

The embedding is MobileBERT's trigram input: word vectors of width ``embedding_size`` for
the next, current and previous token (zeros past the ends) are concatenated and projected
to ``h`` (``embedding_transformation``), then positions and token types are added and
normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import nn

from gkd.models.attention import TappedCoreAttention
from gkd.models.config import ModelConfig
from gkd.models.layers import FfnOutputLinear

HF_DEFAULT_LAYER_NORM_EPS = 1e-5
"""transformers builds the embedding norm and the final FFN's norm without ``layer_norm_eps``
(``nn.LayerNorm``'s default); gkd does the same so LayerNorm checkpoints match."""


class NoNorm(nn.Module):
    """MobileBERT's "normalisation": an elementwise affine map ``x·weight + bias``."""

    def __init__(self, size: int, eps: float | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        del eps  # accepted for a LayerNorm-compatible signature
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def make_norm(kind: str, size: int, eps: float, dtype: torch.dtype) -> nn.Module:
    """``NoNorm`` (``"no_norm"``) or ``nn.LayerNorm`` (``"layer_norm"``) of width ``size``."""
    if kind == "no_norm":
        return NoNorm(size, dtype=dtype)
    if kind == "layer_norm":
        return nn.LayerNorm(size, eps=eps, dtype=dtype)
    raise ValueError(f"normalization_type ({kind!r}) must be 'no_norm' or 'layer_norm'")


def _init_linear(module: nn.Linear | nn.Embedding, init_method: Any) -> None:
    with torch.no_grad():
        init_method(module.weight)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


# --------------------------------------------------------------------------- embeddings
class BottleneckEmbeddings(nn.Module):
    """Trigram word embeddings (width ``embedding_size``) projected to ``hidden_size``, plus
    learned positions and token types, then the norm and dropout → ``[s, b, h]``."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig, padded_vocab: int) -> None:
        super().__init__()
        dtype = tconfig.params_dtype
        emb, h = cfg.word_embedding_size, cfg.hidden_size
        self.trigram_input = cfg.trigram_input
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, emb, init_method=tconfig.init_method, config=tconfig
        )
        # transformers always has the projection, and applies it only when it changes the width.
        self.embedding_transformation = nn.Linear(emb * (3 if cfg.trigram_input else 1), h, dtype=dtype)
        self.project = cfg.trigram_input or emb != h
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h, dtype=dtype)
        self.token_type_embeddings = (
            nn.Embedding(cfg.type_vocab_size, h, dtype=dtype) if cfg.type_vocab_size > 0 else None
        )
        self.norm = make_norm(cfg.normalization_type, h, HF_DEFAULT_LAYER_NORM_EPS, dtype)
        self.dropout = cfg.hidden_dropout
        if tconfig.perform_initialization:
            for module in (
                self.embedding_transformation,
                self.position_embeddings,
                self.token_type_embeddings,
            ):
                if module is not None:
                    _init_linear(module, tconfig.init_method)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [b, s, e], full on every TP rank
        if self.trigram_input:
            nxt = F.pad(x[:, 1:], (0, 0, 0, 1))  # token i+1 (zeros after the last)
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # token i-1 (zeros before the first)
            x = torch.cat([nxt, x, prev], dim=-1)
        if self.project:
            x = self.embedding_transformation(x)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = x + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = F.dropout(self.norm(x), p=self.dropout, training=self.training)
        return x.transpose(0, 1).contiguous()


# --------------------------------------------------------------------------- attention
@dataclass
class BottleneckAttentionSubmodules:
    """Submodule specs of :class:`BottleneckSelfAttention`."""

    linear_q: ModuleSpec | type
    linear_k: ModuleSpec | type
    linear_v: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


class BottleneckSelfAttention(MegatronModule):
    """Self-attention whose query/key and value come from different inputs (MobileBERT).

    ``linear_q``/``linear_k`` read ``query_input_size``-wide inputs, ``linear_v``
    ``value_input_size``-wide ones; all three produce ``heads · head_dim`` (= the true hidden
    size), column-parallel by heads. Returns ``(output, bias)`` of the row-parallel
    ``linear_proj`` (bias not added, as megatron's ``SelfAttention``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: BottleneckAttentionSubmodules,
        layer_number: int = 1,
        query_input_size: int | None = None,
        value_input_size: int | None = None,
    ) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads_local = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        width = config.num_attention_heads * config.kv_channels
        q_in = query_input_size if query_input_size is not None else width
        v_in = value_input_size if value_input_size is not None else width

        def column(spec: ModuleSpec | type, size: int) -> Any:
            return build_module(
                spec,
                size,
                width,
                config=config,
                init_method=config.init_method,
                gather_output=False,
                bias=True,
                skip_bias_add=False,
                is_expert=False,
            )

        self.linear_q = column(submodules.linear_q, q_in)
        self.linear_k = column(submodules.linear_k, q_in)
        self.linear_v = column(submodules.linear_v, v_in)
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.padding,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            width,
            width,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )

    def _heads(self, linear: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
        out, _ = linear(x)  # [s, b, heads_local * d]
        return out.view(*out.shape[:2], self.heads_local, self.head_dim)

    def forward(
        self,
        query_input: torch.Tensor,
        key_input: torch.Tensor,
        value_input: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self._heads(self.linear_q, query_input)
        k = self._heads(self.linear_k, key_input)
        v = self._heads(self.linear_v, value_input)
        context = self.core_attention(q, k, v, attention_mask)
        return self.linear_proj(context)


# --------------------------------------------------------------------------- FFN
class BottleneckMLP(MegatronModule):
    """``fc2(act(fc1(x)))`` at the true hidden size; returns ``(output, bias)`` of ``linear_fc2``.

    megatron's ``MLP`` projects back to ``config.hidden_size`` (the residual width), hence
    this variant whose output width is its input width.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        input_size: int,
        ffn_hidden_size: int,
    ) -> None:
        super().__init__(config=config)
        self.activation_func = config.activation_func
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            input_size,
            ffn_hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=True,
            is_expert=False,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            ffn_hidden_size,
            input_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, bias = self.linear_fc1(x)
        if bias is not None:
            h = h + bias
        return self.linear_fc2(self.activation_func(h))


# --------------------------------------------------------------------------- layer
@dataclass
class BottleneckLayerSubmodules:
    """Submodule specs of :class:`BottleneckTransformerLayer`."""

    self_attention: ModuleSpec | type
    ffn: ModuleSpec | type
    """The ``num_feedforward_networks - 1`` stacked FFNs (no tap)."""
    mlp: ModuleSpec | type
    """The final FFN; its ``linear_fc2`` input is the ``ffn.intermediate`` tap point."""


class BottleneckTransformerLayer(MegatronModule):
    """One MobileBERT layer on ``[s, b, h]`` hidden states (see the module docstring).

    Args:
        config: megatron ``TransformerConfig`` of the model (``hidden_size`` = residual width,
            ``kv_channels`` = true hidden size / heads).
        submodules: :class:`BottleneckLayerSubmodules`.
        layer_number: 1-based index (megatron convention).
        Remaining keyword arguments: the IB options of :class:`~gkd.models.config.ModelConfig`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: BottleneckLayerSubmodules,
        layer_number: int = 1,
        *,
        true_hidden_size: int,
        use_bottleneck: bool = True,
        use_bottleneck_attention: bool = False,
        key_query_shared_bottleneck: bool = True,
        num_feedforward_networks: int = 4,
        normalization_type: str = "no_norm",
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        h, t = config.hidden_size, true_hidden_size
        dtype = config.params_dtype
        eps = config.layernorm_epsilon
        self.use_bottleneck = use_bottleneck
        self.use_bottleneck_attention = use_bottleneck_attention
        self.key_query_shared_bottleneck = key_query_shared_bottleneck
        self.hidden_dropout = config.hidden_dropout

        def norm(size: int, norm_eps: float = eps) -> nn.Module:
            return make_norm(normalization_type, size, norm_eps, dtype)

        replicated: list[nn.Linear] = []
        self.bottleneck_input = self.bottleneck_input_norm = None
        self.bottleneck_attention = self.bottleneck_attention_norm = None
        self.output_bottleneck = self.output_norm = None
        if use_bottleneck:
            self.bottleneck_input = nn.Linear(h, t, dtype=dtype)
            self.bottleneck_input_norm = norm(t)
            replicated.append(self.bottleneck_input)
            if key_query_shared_bottleneck:
                # transformers builds it also when use_bottleneck_attention leaves it unused.
                self.bottleneck_attention = nn.Linear(h, t, dtype=dtype)
                self.bottleneck_attention_norm = norm(t)
                replicated.append(self.bottleneck_attention)
        value_width = t if use_bottleneck_attention else h
        self.self_attention = build_module(
            submodules.self_attention,
            config=config,
            layer_number=layer_number,
            query_input_size=t,
            value_input_size=value_width,
        )
        self.attention_norm = norm(t)
        ffn = config.ffn_hidden_size
        self.ffns = nn.ModuleList(
            build_module(submodules.ffn, config=config, input_size=t, ffn_hidden_size=ffn)
            for _ in range(num_feedforward_networks - 1)
        )
        self.ffn_norms = nn.ModuleList(norm(t) for _ in range(num_feedforward_networks - 1))
        self.mlp = build_module(submodules.mlp, config=config, input_size=t, ffn_hidden_size=ffn)
        self.mlp_norm = norm(t, HF_DEFAULT_LAYER_NORM_EPS)
        if use_bottleneck:
            self.output_bottleneck = nn.Linear(t, h, dtype=dtype)
            self.output_norm = norm(h)
            replicated.append(self.output_bottleneck)
        if config.perform_initialization:
            for module in replicated:
                _init_linear(module, config.init_method)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.hidden_dropout, training=self.training)

    @staticmethod
    def _add_bias(branch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        out, bias = branch
        return out if bias is None else out + bias

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the layer.

        Args:
            hidden_states: ``[s, b, h]`` (the residual stream).
            attention_mask: Boolean, True = masked, broadcastable to ``[b, 1, s, s]``.

        Returns:
            ``[s, b, h]``.
        """
        h_in = hidden_states
        if self.use_bottleneck:
            assert self.bottleneck_input is not None and self.bottleneck_input_norm is not None
            layer_input = self.bottleneck_input_norm(self.bottleneck_input(h_in))
            if self.use_bottleneck_attention:
                q_in = v_in = layer_input
            elif self.bottleneck_attention is not None:
                assert self.bottleneck_attention_norm is not None
                q_in = self.bottleneck_attention_norm(self.bottleneck_attention(h_in))
                v_in = h_in
            else:  # only valid when intra_bottleneck_size == hidden_size (checked by ModelConfig)
                q_in = v_in = h_in
        else:
            layer_input = q_in = v_in = h_in
        attn = self._add_bias(self.self_attention(q_in, q_in, v_in, attention_mask))
        if not self.use_bottleneck:
            attn = self._dropout(attn)
        x = self.attention_norm(attn + layer_input)
        for ffn, norm in zip(self.ffns, self.ffn_norms, strict=True):
            x = norm(self._add_bias(ffn(x)) + x)
        y = self._add_bias(self.mlp(x))
        if not self.use_bottleneck:
            return self.mlp_norm(self._dropout(y) + x)
        assert self.output_bottleneck is not None and self.output_norm is not None
        y = self.output_bottleneck(self.mlp_norm(y + x))
        return self.output_norm(self._dropout(y) + h_in)


def get_mobilebert_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """MobileBERT layer of ``cfg``: bottlenecks, attention at the true hidden size, stacked FFNs."""
    attention = ModuleSpec(
        module=BottleneckSelfAttention,
        submodules=BottleneckAttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_k=ColumnParallelLinear,
            linear_v=ColumnParallelLinear,
            core_attention=TappedCoreAttention,
            linear_proj=RowParallelLinear,
        ),
    )
    return ModuleSpec(
        module=BottleneckTransformerLayer,
        params={
            "true_hidden_size": cfg.true_hidden_size,
            "use_bottleneck": cfg.use_bottleneck,
            "use_bottleneck_attention": cfg.use_bottleneck_attention,
            "key_query_shared_bottleneck": cfg.key_query_shared_bottleneck,
            "num_feedforward_networks": cfg.num_feedforward_networks,
            "normalization_type": cfg.normalization_type,
        },
        submodules=BottleneckLayerSubmodules(
            self_attention=attention,
            ffn=ModuleSpec(
                module=BottleneckMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp=ModuleSpec(
                module=BottleneckMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=FfnOutputLinear),
            ),
        ),
    )


__all__ = [
    "HF_DEFAULT_LAYER_NORM_EPS",
    "BottleneckAttentionSubmodules",
    "BottleneckEmbeddings",
    "BottleneckLayerSubmodules",
    "BottleneckMLP",
    "BottleneckSelfAttention",
    "BottleneckTransformerLayer",
    "NoNorm",
    "get_mobilebert_layer_spec",
]
