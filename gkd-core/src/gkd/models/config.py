"""Architecture description of a gkd model, and its mapping to HF and megatron configs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

Family = Literal["encoder", "decoder"]
Variant = Literal["standard", "mobilebert"]
NormType = Literal["no_norm", "layer_norm"]
HeadKind = Literal["none", "lm", "mlm", "classification"]
DType = Literal["float32", "bfloat16", "float16"]

FAMILIES: tuple[str, ...] = ("encoder", "decoder")
VARIANTS: tuple[str, ...] = ("standard", "mobilebert")
NORM_TYPES: tuple[str, ...] = ("no_norm", "layer_norm")
HEADS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "encoder": ("none", "mlm", "classification"),
    "decoder": ("none", "lm"),
}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# HF architecture names written by to_hf_config() and understood by from_hf_config().
_ENCODER_ARCH = {
    "none": "BertModel",
    "mlm": "BertForMaskedLM",
    "classification": "BertForSequenceClassification",
}
_DECODER_ARCH = {"none": "LlamaModel", "lm": "LlamaForCausalLM"}
_MOBILEBERT_ARCH = {
    "none": "MobileBertModel",
    "mlm": "MobileBertForMaskedLM",
    "classification": "MobileBertForSequenceClassification",
}
# The inverted-bottleneck fields with the values they have in a standard model (and their
# HF MobileBertConfig defaults where those differ: embedding_size 128, intra_bottleneck_size 128).
_IB_DEFAULTS: dict[str, Any] = {
    "embedding_size": None,
    "trigram_input": True,
    "use_bottleneck": True,
    "intra_bottleneck_size": None,
    "use_bottleneck_attention": False,
    "key_query_shared_bottleneck": True,
    "num_feedforward_networks": 4,
    "normalization_type": "no_norm",
    "classifier_activation": True,
}


@dataclass
class ModelConfig:
    """Shape and options of a teacher or student model.

    ``encoder`` is BERT/MiniLM (post-LayerNorm, learned absolute positions, token types, GELU
    MLP), or with ``variant="mobilebert"`` MobileBERT's inverted-bottleneck encoder; ``decoder`` is Llama/SmolLM2 (pre-RMSNorm, RoPE, SwiGLU, grouped-query attention,
    causal). Tensor-parallel size is not part of the config: it comes from
    :mod:`gkd.parallel` when the model is built.
    """

    # ------------------------------------------------------------------ architecture
    family: Family
    """``"encoder"`` (BERT-like) or ``"decoder"`` (Llama-like)."""
    vocab_size: int
    """Number of token ids (unpadded; gkd pads internally when tp does not divide it)."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of transformer layers."""
    num_attention_heads: int
    """Query heads per layer."""
    ffn_hidden_size: int
    """Width of the MLP (``intermediate_size`` in HF)."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None`` means ``num_attention_heads``."""
    head_dim: int | None = None
    """Per-head width; ``None`` means ``hidden_size // num_attention_heads``."""
    max_position_embeddings: int = 512
    """Longest sequence (learned positions for encoders; informational for RoPE decoders)."""
    type_vocab_size: int = 2
    """Token-type (segment) vocabulary of encoders; 0 disables token-type embeddings (always 0 for decoders)."""
    hidden_act: str = "gelu"
    """MLP activation: ``gelu``, ``gelu_new``, ``relu`` for encoders; ``silu`` (SwiGLU) for decoders."""
    norm_eps: float = 1e-12
    """LayerNorm / RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base of decoders."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM / MLM output projection."""

    # ------------------------------------------------------------------ heads
    head: HeadKind = "none"
    """Output head: ``none``; ``lm`` (decoder); ``mlm`` or ``classification`` (encoder)."""
    add_pooler: bool = True
    """Encoder pooler (tanh(dense(h[CLS]))); required by the classification head (always False for decoders)."""
    num_labels: int = 2
    """Classes of the classification head."""
    id2label: dict[int, str] | None = None
    """Optional label names, written to the exported HF config."""
    classifier_dropout: float | None = None
    """Dropout before the classifier; ``None`` means ``hidden_dropout``."""

    # ------------------------------------------------------------------ training
    hidden_dropout: float = 0.1
    """Dropout on the residual branches and the embeddings."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of random weights."""
    dtype: DType = "float32"
    """Parameter dtype. Only ``float32`` is allowed without CUDA."""

    # ------------------------------------------------------------------ tokens
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    extra_hf: dict[str, Any] = field(default_factory=dict)
    """HF config keys gkd does not interpret; kept so an export round-trips them."""

    # ------------------------------------------------------------------ MobileBERT (IB)
    variant: Variant = "standard"
    """``"standard"`` (BERT / Llama layers) or ``"mobilebert"``: the inverted-bottleneck
    encoder of MobileBERT (family ``encoder``). The fields below mirror HF's
    ``MobileBertConfig`` and only apply to ``"mobilebert"`` (they must keep their defaults
    otherwise)."""
    embedding_size: int | None = None
    """Width of the word embedding table (``None``: ``hidden_size``)."""
    trigram_input: bool = True
    """Embed ``[next, current, previous]`` token vectors (3·embedding_size) and project them to ``hidden_size``."""
    use_bottleneck: bool = True
    """Project the residual stream (``hidden_size``) into each layer's ``intra_bottleneck_size`` and back."""
    intra_bottleneck_size: int | None = None
    """Width of attention and FFNs inside a layer (the "true hidden size"; ``None``: ``hidden_size``)."""
    use_bottleneck_attention: bool = False
    """Query, key and value all from the input bottleneck (else value from the residual stream)."""
    key_query_shared_bottleneck: bool = True
    """Query and key from a second, shared bottleneck projection."""
    num_feedforward_networks: int = 4
    """FFNs per layer (the first ``n - 1`` stacked with residual + norm, then the final one)."""
    normalization_type: NormType = "no_norm"
    """``"no_norm"`` (elementwise ``x·w + b``) or ``"layer_norm"``."""
    classifier_activation: bool = True
    """Pooler is ``tanh(dense(h[CLS]))``; False: the pooled vector is ``h[CLS]`` itself (no parameters)."""

    def __post_init__(self) -> None:
        if self.family == "decoder":
            # Encoder-only options have no meaning for decoders; normalise so equal
            # architectures compare equal.
            self.type_vocab_size, self.add_pooler = 0, False
        errors: list[str] = []
        if self.family not in FAMILIES:
            errors.append(f"family ({self.family!r}) must be one of {FAMILIES}")
        elif self.head not in HEADS_BY_FAMILY[self.family]:
            errors.append(
                f"head ({self.head!r}) must be one of {HEADS_BY_FAMILY[self.family]} for family {self.family!r}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} ({getattr(self, name)}) must be positive")
        if (
            self.head_dim is None
            and self.variant == "standard"
            and self.num_attention_heads > 0
            and self.hidden_size % self.num_attention_heads
        ):
            errors.append(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}) unless head_dim is given"
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_attention_heads % kv:
            errors.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_kv_heads ({kv})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            errors.append(f"hidden_act ({self.hidden_act!r}) must be one of {sorted(_ACTIVATIONS)}")
        if self.family == "decoder" and self.hidden_act not in ("silu", "swish"):
            errors.append(f"decoder models use SwiGLU: hidden_act ({self.hidden_act!r}) must be 'silu'")
        if self.family == "encoder" and kv != self.num_attention_heads:
            errors.append(
                f"encoders use multi-head attention: num_kv_heads ({kv}) must equal num_attention_heads ({self.num_attention_heads})"
            )
        if self.head == "classification" and not self.add_pooler:
            errors.append(
                "head 'classification' needs add_pooler=True (pooler tanh on [CLS], as BertForSequenceClassification)"
            )
        if self.head == "classification" and self.num_labels < 1:
            errors.append(f"num_labels ({self.num_labels}) must be >= 1")
        if self.dtype not in _DTYPES:
            errors.append(f"dtype ({self.dtype!r}) must be one of {sorted(_DTYPES)}")
        errors += self._bottleneck_errors()
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    def _bottleneck_errors(self) -> list[str]:
        if self.variant not in VARIANTS:
            return [f"variant ({self.variant!r}) must be one of {VARIANTS}"]
        if self.variant == "standard":
            changed = [k for k, v in _IB_DEFAULTS.items() if getattr(self, k) != v]
            return [
                f"{k} ({getattr(self, k)!r}) only applies to variant 'mobilebert' (this config is 'standard')"
                for k in changed
            ]
        errors: list[str] = []
        if self.family != "encoder":
            errors.append(f"variant 'mobilebert' is an encoder; family ({self.family!r}) must be 'encoder'")
        if self.normalization_type not in NORM_TYPES:
            errors.append(f"normalization_type ({self.normalization_type!r}) must be one of {NORM_TYPES}")
        for name in ("embedding_size", "intra_bottleneck_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                errors.append(f"{name} ({value}) must be positive")
        if self.num_feedforward_networks < 1:
            errors.append(f"num_feedforward_networks ({self.num_feedforward_networks}) must be >= 1")
        if self.head_dim is not None:
            errors.append(
                "variant 'mobilebert' derives head_dim from intra_bottleneck_size; leave head_dim unset"
            )
        true = self.true_hidden_size
        if self.num_attention_heads > 0 and true % self.num_attention_heads:
            errors.append(
                f"the attention width ({true}, intra_bottleneck_size) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if (
            self.use_bottleneck
            and not self.use_bottleneck_attention
            and not self.key_query_shared_bottleneck
            and true != self.hidden_size
        ):
            errors.append(
                "with use_bottleneck and neither use_bottleneck_attention nor key_query_shared_bottleneck, "
                f"query/key read the residual stream: intra_bottleneck_size ({true}) must equal hidden_size "
                f"({self.hidden_size}) (as in transformers' MobileBERT)"
            )
        if self.head == "mlm" and self.word_embedding_size >= self.hidden_size:
            errors.append(
                f"the MobileBERT MLM head needs embedding_size ({self.word_embedding_size}) < hidden_size "
                f"({self.hidden_size}) (its decoder is [word embeddings; dense] over hidden_size)"
            )
        return errors

    # ------------------------------------------------------------------ derived values
    @property
    def is_mobilebert(self) -> bool:
        """Whether this is the MobileBERT inverted-bottleneck encoder."""
        return self.variant == "mobilebert"

    @property
    def word_embedding_size(self) -> int:
        """Width of the word embedding table (``embedding_size``, else ``hidden_size``)."""
        return self.embedding_size if self.embedding_size is not None else self.hidden_size

    @property
    def true_hidden_size(self) -> int:
        """Width inside a layer (attention, FFNs): ``intra_bottleneck_size`` for IB layers with
        ``use_bottleneck``, else ``hidden_size``."""
        if self.is_mobilebert and self.use_bottleneck and self.intra_bottleneck_size is not None:
            return self.intra_bottleneck_size
        return self.hidden_size

    @property
    def attention_size(self) -> int:
        """Width of the attention (heads × head_dim): the ``attention.context`` tap's last dimension."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads`` or ``num_attention_heads``)."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """Per-head width."""
        if self.head_dim is not None:
            return self.head_dim
        return self.true_hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        """Parameter dtype as a ``torch.dtype``."""
        return _DTYPES[self.dtype]

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP activation function."""
        return _ACTIVATIONS[self.hidden_act]

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of ``tp`` (megatron splits rows evenly)."""
        return -(-self.vocab_size // tp) * tp

    # ------------------------------------------------------------------ megatron
    def to_transformer_config(self, tp: int, *, init_weights: bool = True) -> Any:
        """The megatron-core ``TransformerConfig`` for this model at tensor-parallel size ``tp``."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        errors = []
        if self.num_attention_heads % tp:
            errors.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of tp ({tp})")
        if self.kv_heads % tp:
            errors.append(f"num_kv_heads ({self.kv_heads}) must be a multiple of tp ({tp})")
        if self.ffn_hidden_size % tp:
            errors.append(f"ffn_hidden_size ({self.ffn_hidden_size}) must be a multiple of tp ({tp})")
        if errors:
            raise ValueError("model cannot be split over tensor-parallel ranks: " + "; ".join(errors))
        if self.dtype != "float32" and not torch.cuda.is_available():
            raise ValueError(f"dtype {self.dtype!r} needs CUDA; gkd models run in float32 on CPU")
        encoder = self.family == "encoder"
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.kv_heads,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            layernorm_epsilon=self.norm_eps,
            normalization="LayerNorm" if encoder else "RMSNorm",
            add_bias_linear=encoder,
            gated_linear_unit=not encoder,
            activation_func=self.activation,
            init_method_std=self.initializer_range,
            params_dtype=self.torch_dtype,
            bf16=self.dtype == "bfloat16",
            fp16=self.dtype == "float16",
            tensor_model_parallel_size=tp,
            # Full master weights are drawn on the CPU and sliced per rank, so a TP=k model
            # starts from exactly the weights of the TP=1 model with the same seed.
            use_cpu_initialization=True,
            perform_initialization=init_weights,
            # No apex / TransformerEngine / fused kernels: plain torch ops everywhere.
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            rotary_interleaved=False,
            # megatron 0.16's default "full" is deprecated (and warns); [] means the same.
            cuda_graph_scope=[],
        )

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(
        cls, hf: Mapping[str, Any], *, head: HeadKind | None = None, **overrides: Any
    ) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (``bert``, ``mobilebert`` or ``llama`` model types).

        Args:
            hf: The parsed ``config.json``.
            head: Output head; by default inferred from ``architectures``.
            **overrides: Fields to set on top (e.g. ``num_labels=4``, ``hidden_dropout=0.0``).

        Raises:
            ValueError: Unsupported model type or option.
        """
        model_type = hf.get("model_type")
        arch = (hf.get("architectures") or [""])[0]
        known: set[str] = {
            "architectures",
            "model_type",
            "transformers_version",
            "_name_or_path",
            "dtype",
            "torch_dtype",
        }

        def take(key: str, default: Any = None) -> Any:
            known.add(key)
            return hf.get(key, default)

        def encoder_head_and_labels() -> dict[str, Any]:
            """The head (from ``architectures`` unless given), label count and names of an encoder."""
            own = head or (
                "mlm"
                if ("MaskedLM" in arch or "PreTraining" in arch)
                else ("classification" if "SequenceClassification" in arch else "none")
            )
            id2label = take("id2label")
            num_labels = len(id2label) if id2label else take("num_labels", 2)
            if id2label and all(str(v) == f"LABEL_{k}" for k, v in id2label.items()):
                id2label = None  # transformers' placeholder names carry no information
            take("label2id")
            return dict(
                head=own,
                add_pooler=own != "mlm",
                num_labels=num_labels,
                id2label={int(k): str(v) for k, v in id2label.items()}
                if id2label and own == "classification"
                else None,
            )

        if model_type == "bert":
            if take("position_embedding_type", "absolute") != "absolute":
                raise ValueError(
                    f"only absolute position embeddings are supported, got {hf['position_embedding_type']!r}"
                )
            if take("is_decoder", False) or take("add_cross_attention", False):
                raise ValueError("BERT configs with is_decoder/add_cross_attention are not supported")
            kw: dict[str, Any] = dict(
                **encoder_head_and_labels(),
                family="encoder",
                vocab_size=take("vocab_size"),
                hidden_size=take("hidden_size"),
                num_layers=take("num_hidden_layers"),
                num_attention_heads=take("num_attention_heads"),
                ffn_hidden_size=take("intermediate_size"),
                max_position_embeddings=take("max_position_embeddings", 512),
                type_vocab_size=take("type_vocab_size", 2),
                hidden_act=take("hidden_act", "gelu"),
                norm_eps=take("layer_norm_eps", 1e-12),
                tie_word_embeddings=take("tie_word_embeddings", True),
                classifier_dropout=take("classifier_dropout"),
                hidden_dropout=take("hidden_dropout_prob", 0.1),
                attention_dropout=take("attention_probs_dropout_prob", 0.1),
                initializer_range=take("initializer_range", 0.02),
                pad_token_id=take("pad_token_id", 0),
                bos_token_id=take("bos_token_id"),
                eos_token_id=take("eos_token_id"),
            )
        elif model_type == "llama":
            rope = take("rope_parameters") or take("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"RoPE scaling {rope_type!r} is not supported (only the default RoPE)")
            theta = rope.get("rope_theta", take("rope_theta", 10000.0))
            take("rope_theta")
            if take("attention_bias", False) or take("mlp_bias", False):
                raise ValueError("Llama configs with attention_bias/mlp_bias are not supported")
            if take("pretraining_tp", 1) != 1:
                raise ValueError("pretraining_tp != 1 is not supported")
            if head is None:
                head = "lm" if "CausalLM" in arch else "none"
            hidden, heads = take("hidden_size"), take("num_attention_heads")
            head_dim = take("head_dim")
            kw = dict(
                family="decoder",
                vocab_size=take("vocab_size"),
                hidden_size=hidden,
                num_layers=take("num_hidden_layers"),
                num_attention_heads=heads,
                num_kv_heads=take("num_key_value_heads", heads),
                head_dim=None if head_dim in (None, hidden // heads) else head_dim,
                ffn_hidden_size=take("intermediate_size"),
                max_position_embeddings=take("max_position_embeddings", 2048),
                type_vocab_size=0,
                hidden_act=take("hidden_act", "silu"),
                norm_eps=take("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                tie_word_embeddings=take("tie_word_embeddings", False),
                head=head,
                add_pooler=False,
                hidden_dropout=0.0,
                attention_dropout=take("attention_dropout", 0.0),
                initializer_range=take("initializer_range", 0.02),
                pad_token_id=take("pad_token_id"),
                bos_token_id=take("bos_token_id"),
                eos_token_id=take("eos_token_id"),
            )
        elif model_type == "mobilebert":
            hidden = take("hidden_size", 512)
            use_bottleneck = take("use_bottleneck", True)
            intra = take("intra_bottleneck_size", 128)
            take("true_hidden_size")  # derived by transformers from the two above
            kw = dict(
                **encoder_head_and_labels(),
                family="encoder",
                variant="mobilebert",
                vocab_size=take("vocab_size", 30522),
                hidden_size=hidden,
                num_layers=take("num_hidden_layers", 24),
                num_attention_heads=take("num_attention_heads", 4),
                ffn_hidden_size=take("intermediate_size", 512),
                max_position_embeddings=take("max_position_embeddings", 512),
                type_vocab_size=take("type_vocab_size", 2),
                hidden_act=take("hidden_act", "relu"),
                norm_eps=take("layer_norm_eps", 1e-12),
                tie_word_embeddings=take("tie_word_embeddings", True),
                classifier_dropout=take("classifier_dropout"),
                hidden_dropout=take("hidden_dropout_prob", 0.0),
                attention_dropout=take("attention_probs_dropout_prob", 0.1),
                initializer_range=take("initializer_range", 0.02),
                pad_token_id=take("pad_token_id", 0),
                bos_token_id=take("bos_token_id"),
                eos_token_id=take("eos_token_id"),
                embedding_size=take("embedding_size", 128),
                trigram_input=take("trigram_input", True),
                use_bottleneck=use_bottleneck,
                intra_bottleneck_size=intra if use_bottleneck else None,
                use_bottleneck_attention=take("use_bottleneck_attention", False),
                key_query_shared_bottleneck=take("key_query_shared_bottleneck", True),
                num_feedforward_networks=take("num_feedforward_networks", 4),
                normalization_type=take("normalization_type", "no_norm"),
                classifier_activation=take("classifier_activation", True),
            )
        else:
            raise ValueError(
                f"unsupported model_type {model_type!r}; gkd reads 'bert' and 'mobilebert' (encoders) "
                "and 'llama' (decoder)"
            )
        # Keys HF writes for every model; they carry no architecture information.
        known |= {
            "num_labels",
            "problem_type",
            "use_cache",
            "gradient_checkpointing",
            "output_hidden_states",
            "output_attentions",
            "return_dict",
            "chunk_size_feed_forward",
            "is_encoder_decoder",
        }
        kw["extra_hf"] = {k: v for k, v in hf.items() if k not in known}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (``BertModel``/``BertFor*``, ``MobileBert*`` or ``Llama*``)."""
        hf: dict[str, Any]
        if self.is_mobilebert:
            hf = self._mobilebert_hf_config()
        elif self.family == "encoder":
            hf = {
                "architectures": [_ENCODER_ARCH[self.head]],
                "model_type": "bert",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads,
                "intermediate_size": self.ffn_hidden_size,
                "hidden_act": self.hidden_act,
                "hidden_dropout_prob": self.hidden_dropout,
                "attention_probs_dropout_prob": self.attention_dropout,
                "max_position_embeddings": self.max_position_embeddings,
                "type_vocab_size": self.type_vocab_size,
                "initializer_range": self.initializer_range,
                "layer_norm_eps": self.norm_eps,
                "position_embedding_type": "absolute",
                "tie_word_embeddings": self.tie_word_embeddings,
                "classifier_dropout": self.classifier_dropout,
            }
            if self.head == "classification":
                labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
                hf["id2label"] = {str(k): v for k, v in labels.items()}
                hf["label2id"] = {v: k for k, v in labels.items()}
        else:
            hf = {
                "architectures": [_DECODER_ARCH[self.head]],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.kv_heads,
                "head_dim": self.kv_channels,
                "intermediate_size": self.ffn_hidden_size,
                "hidden_act": self.hidden_act,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.norm_eps,
                # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
                "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "attention_bias": False,
                "attention_dropout": self.attention_dropout,
                "mlp_bias": False,
                "initializer_range": self.initializer_range,
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        hf.update(
            {
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            }
        )
        hf["torch_dtype"] = self.dtype
        for key, value in self.extra_hf.items():
            hf.setdefault(key, value)
        return hf

    def _mobilebert_hf_config(self) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "architectures": [_MOBILEBERT_ARCH[self.head]],
            "model_type": "mobilebert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.ffn_hidden_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "classifier_dropout": self.classifier_dropout,
            "embedding_size": self.word_embedding_size,
            "trigram_input": self.trigram_input,
            "use_bottleneck": self.use_bottleneck,
            "intra_bottleneck_size": self.true_hidden_size,
            "use_bottleneck_attention": self.use_bottleneck_attention,
            "key_query_shared_bottleneck": self.key_query_shared_bottleneck,
            "num_feedforward_networks": self.num_feedforward_networks,
            "normalization_type": self.normalization_type,
            "classifier_activation": self.classifier_activation,
        }
        if self.head == "classification":
            labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
            hf["id2label"] = {str(k): v for k, v in labels.items()}
            hf["label2id"] = {v: k for k, v in labels.items()}
        return hf


__all__ = [
    "FAMILIES",
    "HEADS_BY_FAMILY",
    "NORM_TYPES",
    "VARIANTS",
    "DType",
    "Family",
    "HeadKind",
    "ModelConfig",
    "NormType",
    "Variant",
]
