"""``GkdModel``: encoder and decoder models on megatron-core, with taps and operations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from gkd import parallel
from gkd.models.bottleneck import BottleneckEmbeddings, get_mobilebert_layer_spec
from gkd.models.config import ModelConfig
from gkd.models.layers import get_decoder_layer_spec, get_encoder_layer_spec
from gkd.models.sharding import ShardKind, shard_kind
from gkd.models.taps import (
    LAYER_ROLES,
    LAYERS_OPERATION,
    VOCAB_SHARD,
    CaptureSession,
    Layout,
    Operation,
    activate,
    tap,
)


class ForwardOutput(NamedTuple):
    """Result of a forward pass (a named tuple: wrappers that hook a module's outputs, such as
    DeepSpeed ZeRO-3 re-gathering parameters for the backward, see its tensors).

    Attributes:
        logits: ``[b, s, V]`` (LM / MLM head, full vocabulary on every TP rank),
            ``[b, num_labels]`` (classification) or ``None`` (no head; or a capture that asked
            for ``logits.vocab_shard`` without ``logits``: the all-gather was skipped and the
            local shard is in the captured features).
        last_hidden: ``[b, s, h]`` — last layer output (encoder) or final norm output (decoder).
        pooled: ``[b, h]`` pooler output of encoders with a pooler, else ``None``.
    """

    logits: torch.Tensor | None
    last_hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def _init_replicated(module: nn.Module, init_method: object) -> None:
    """HF/megatron-style init of a replicated module: N(0, std) weights, zero biases."""
    with torch.no_grad():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init_method(module.weight)  # type: ignore[operator]
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class Embeddings(nn.Module):
    """Token (+ learned position + token type, LayerNorm for encoders) embeddings → ``[s, b, h]``."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig, padded_vocab: int) -> None:
        super().__init__()
        dtype = tconfig.params_dtype
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=tconfig.init_method, config=tconfig
        )
        encoder = cfg.family == "encoder"
        self.position_embeddings = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype) if encoder else None
        )
        self.token_type_embeddings = (
            nn.Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype)
            if encoder and cfg.type_vocab_size > 0
            else None
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype) if encoder else None
        self.dropout = cfg.hidden_dropout if encoder else 0.0
        if tconfig.perform_initialization:
            for emb in (self.position_embeddings, self.token_type_embeddings):
                if emb is not None:
                    _init_replicated(emb, tconfig.init_method)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [b, s, h]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            positions = torch.arange(input_ids.size(1), device=input_ids.device)
            x = x + self.position_embeddings(positions)[None]
        if self.norm is not None:
            x = self.norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        return x.transpose(0, 1).contiguous()


class GkdModel(MegatronModule):
    """A teacher or student: embeddings, a stack of :class:`~gkd.models.layers.GkdTransformerLayer`,
    an optional final norm (decoder) and an optional head.

    Build with :func:`build_model`. ``model.config`` is megatron's ``TransformerConfig``;
    ``model.model_config`` is the :class:`~gkd.models.config.ModelConfig`.
    """

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig) -> None:
        super().__init__(config=tconfig)
        self.model_config = cfg
        tp = tconfig.tensor_model_parallel_size
        self.padded_vocab_size = cfg.padded_vocab_size(tp)
        encoder = cfg.family == "encoder"
        if cfg.is_mobilebert:
            self.embeddings: nn.Module = BottleneckEmbeddings(cfg, tconfig, self.padded_vocab_size)
            spec = get_mobilebert_layer_spec(cfg)
        else:
            self.embeddings = Embeddings(cfg, tconfig, self.padded_vocab_size)
            spec = get_encoder_layer_spec() if encoder else get_decoder_layer_spec(cfg.rope_theta)
        self.layers = nn.ModuleList(
            build_module(spec, config=tconfig, layer_number=i + 1) for i in range(cfg.num_layers)
        )
        dtype = tconfig.params_dtype
        self.final_norm = None if encoder else nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        h = cfg.hidden_size
        self.has_pooler = encoder and cfg.add_pooler
        # MobileBERT with classifier_activation=False pools h[CLS] itself (no parameters).
        self.pooler = nn.Linear(h, h, dtype=dtype) if self.has_pooler and cfg.classifier_activation else None
        self.classifier = nn.Linear(h, cfg.num_labels, dtype=dtype) if cfg.head == "classification" else None
        self.mlm_transform = nn.Linear(h, h, dtype=dtype) if cfg.head == "mlm" else None
        self.mlm_norm = nn.LayerNorm(h, eps=cfg.norm_eps, dtype=dtype) if cfg.head == "mlm" else None
        self.mlm_decoder = self._vocab_projection(cfg, tconfig, bias=True) if cfg.head == "mlm" else None
        # MobileBERT's MLM decoder is [word embeddings (embedding_size) | dense (the rest of
        # hidden_size)] per vocabulary row; both parts are vocabulary-parallel like the embeddings.
        self.mlm_dense = self.mlm_word_decoder = None
        if cfg.is_mobilebert and cfg.head == "mlm":
            emb = cfg.word_embedding_size
            self.mlm_dense = VocabParallelEmbedding(
                self.padded_vocab_size, h - emb, init_method=tconfig.init_method, config=tconfig
            )
            if not cfg.tie_word_embeddings:
                self.mlm_word_decoder = VocabParallelEmbedding(
                    self.padded_vocab_size, emb, init_method=tconfig.init_method, config=tconfig
                )
        self.lm_head = self._vocab_projection(cfg, tconfig, bias=False) if cfg.head == "lm" else None
        if tconfig.perform_initialization:
            for module in (self.pooler, self.classifier, self.mlm_transform):
                if module is not None:
                    _init_replicated(module, tconfig.init_method)
        self._mark_tensor_parallel_params()
        self._pending: CaptureSession | None = None

    def _mark_tensor_parallel_params(self) -> None:
        # megatron only tags sharded weights when it initialises them; tag every parameter
        # (also after init_weights=False) so TP-aware tools — gradient-norm clipping in
        # megatron and DeepSpeed — never count a shard as a replicated duplicate.
        dims = {ShardKind.COLUMN: 0, ShardKind.VOCAB: 0, ShardKind.GLU: 0, ShardKind.ROW: 1}
        for name, param in self.named_parameters():
            if hasattr(param, "tensor_model_parallel"):
                continue
            kind = shard_kind(name, self.model_config)
            param.tensor_model_parallel = kind is not ShardKind.REPLICATED
            param.partition_dim = dims.get(kind, -1)
            param.partition_stride = 2 if kind is ShardKind.GLU else 1

    def _vocab_projection(
        self, cfg: ModelConfig, tconfig: TransformerConfig, *, bias: bool
    ) -> ColumnParallelLinear:
        # Vocabulary-parallel output layer; with tied embeddings it has no weight of its own
        # and receives the (identically sharded) word embedding matrix in forward.
        return ColumnParallelLinear(
            cfg.hidden_size,
            self.padded_vocab_size,
            config=tconfig,
            init_method=tconfig.init_method,
            bias=bias,
            gather_output=False,
            # MobileBERT assembles its decoder weight in forward (see mlm_dense).
            skip_weight_param_allocation=cfg.tie_word_embeddings or cfg.is_mobilebert,
        )

    # ------------------------------------------------------------------ taps
    def tap_names(self) -> list[str]:
        """Every feature name this model can record (see :mod:`gkd.models.taps`)."""
        cfg = self.model_config
        names = ["embeddings"]
        names += [f"layers.{i}.{role}" for i in range(cfg.num_layers) for role in LAYER_ROLES]
        if self.final_norm is not None:
            names.append("final_norm")
        if self.has_pooler:
            names.append("pooled")
        if cfg.head != "none":
            names.append("logits")
        if cfg.head in ("lm", "mlm"):
            names.append(VOCAB_SHARD)
        return names

    def _validate(self, features: Iterable[str], operations: Mapping[str, Operation]) -> None:
        valid = set(self.tap_names())
        unknown = sorted(set(features) - valid) + sorted(set(operations) - valid - {LAYERS_OPERATION})
        if unknown:
            n = self.model_config.num_layers
            extra = [x for x in self.tap_names() if not x.startswith("layers.") and x != "embeddings"]
            raise ValueError(
                f"unknown tap name(s) {unknown}; valid names: embeddings, "
                f"layers.{{0..{n - 1}}}.{{{','.join(LAYER_ROLES)}}}"
                + "".join(f", {x}" for x in extra)
                + f" (operations also accept {LAYERS_OPERATION!r})"
            )
        for name, fn in operations.items():
            if not callable(fn):
                raise TypeError(f"operation at {name!r} must be callable, got {type(fn).__name__}")

    @contextlib.contextmanager
    def capture(
        self, features: Iterable[str] = (), operations: Mapping[str, Operation] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Record ``features`` and apply ``operations`` during the next forward pass.

        The session is attached to the *next* call of this model only and is detached when
        that call returns or raises (later calls in the block run plain), or when the block
        exits without a call. Recorded tensors keep their autograd graph.

        Args:
            features: Tap names to record (see :meth:`tap_names`).
            operations: Tap name → ``fn(tensor) -> tensor`` (batch-first, same shape), or
                ``"layers"`` → ``fn(list[nn.Module]) -> list[nn.Module]``.

        Yields:
            The dict that the forward pass fills with the requested features.

        Raises:
            ValueError: Unknown tap names (the message lists the valid ones).
            RuntimeError: A capture is already pending on this model.
        """
        features = list(features)
        operations = dict(operations or {})
        self._validate(features, operations)
        if self._pending is not None:
            raise RuntimeError("a capture is already pending on this model; captures do not nest")
        session = CaptureSession(features, operations)
        self._pending = session
        try:
            yield session.values
        finally:
            if self._pending is session:
                self._pending = None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run the model.

        Args:
            input_ids: ``[b, s]`` token ids.
            attention_mask: ``[b, s]``, 1 = real token, 0 = padding (optional).
            token_type_ids: ``[b, s]`` segment ids (encoders; default zeros).
        """
        session, self._pending = self._pending, None
        # Activating None as well hides any outer session (a teacher run from inside a
        # student operation must not write into the student's capture).
        with activate(session):
            out = self._forward(input_ids, attention_mask, token_type_ids, session)
        if session is not None and session.missing():
            raise RuntimeError(
                f"requested features were not produced by the forward pass: {session.missing()}"
            )
        return out

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        session: CaptureSession | None,
    ) -> ForwardOutput:
        cfg = self.model_config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if cfg.family == "encoder" and input_ids.size(1) > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.size(1)} exceeds max_position_embeddings {cfg.max_position_embeddings}"
            )
        # megatron convention: boolean, True = masked out; [b, 1, 1, s] masks padded keys.
        mask = None if attention_mask is None else (attention_mask == 0)[:, None, None, :]

        hidden = tap("embeddings", self.embeddings(input_ids, token_type_ids), Layout.SBH)
        layers: list[nn.Module] = list(self.layers)
        if session is not None:
            layers = session.select_layers(layers)
            self._check_layers(layers)
        for i, layer in enumerate(layers):
            scope = session.in_layer(i) if session is not None else contextlib.nullcontext()
            with scope:
                hidden = tap(f"layers.{i}.input", hidden, Layout.SBH)
                hidden = layer(hidden, attention_mask=mask)
                hidden = tap(f"layers.{i}.output", hidden, Layout.SBH)
        if self.final_norm is not None:
            hidden = tap("final_norm", self.final_norm(hidden), Layout.SBH)
        last_hidden = hidden.transpose(0, 1)  # [b, s, h]

        pooled = logits = None
        if self.has_pooler:
            first = last_hidden[:, 0]
            pooled = tap(
                "pooled", torch.tanh(self.pooler(first)) if self.pooler is not None else first, Layout.PUBLIC
            )
        if self.classifier is not None:
            p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
            logits = self.classifier(F.dropout(pooled, p=p, training=self.training))
        elif self.mlm_decoder is not None:
            x = self.mlm_norm(cfg.activation(self.mlm_transform(last_hidden)))
            logits = self._vocab_logits(self.mlm_decoder, x, session)
        elif self.lm_head is not None:
            logits = self._vocab_logits(self.lm_head, last_hidden, session)
        if logits is not None:
            logits = tap("logits", logits, Layout.PUBLIC)
        return ForwardOutput(logits=logits, last_hidden=last_hidden, pooled=pooled)

    def _vocab_logits(
        self, proj: ColumnParallelLinear, x: torch.Tensor, session: CaptureSession | None
    ) -> torch.Tensor | None:
        weight = self.embeddings.word_embeddings.weight if self.model_config.tie_word_embeddings else None
        if self.mlm_dense is not None:
            word = weight if self.mlm_word_decoder is None else self.mlm_word_decoder.weight
            weight = torch.cat([word, self.mlm_dense.weight], dim=1)  # [V_local, h]
        local, _ = proj(x.contiguous(), weight=weight)  # [b, s, V_padded / tp]
        local = tap(VOCAB_SHARD, local, Layout.PUBLIC)
        if session is not None and session.wants(VOCAB_SHARD) and not session.wants("logits"):
            return None  # only the shard is read: the [b, s, V] gather is never materialised
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        return full[..., : self.model_config.vocab_size]

    def _check_layers(self, layers: list[nn.Module]) -> None:
        h = self.model_config.hidden_size
        for i, layer in enumerate(layers):
            other = getattr(getattr(layer, "config", None), "hidden_size", h)
            if other != h:
                raise ValueError(
                    f"layer {i} chosen by the 'layers' operation has hidden size {other}, the model has {h}"
                )

    # ------------------------------------------------------------------ bookkeeping
    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this model's forward reads outside their own sub-module's forward: the word
        embeddings of a tied output layer, MobileBERT's decoder pieces. A wrapper that gathers
        parameters per sub-module (DeepSpeed ZeRO-3) must fetch these with the whole model."""
        if self._vocab_head() is None:
            return []
        found: list[nn.Parameter] = []
        if self.model_config.tie_word_embeddings:
            found.append(self.embeddings.word_embeddings.weight)
        for module in (self.mlm_word_decoder, self.mlm_dense):
            if module is not None:
                found.append(module.weight)
        return found

    def _vocab_head(self) -> ColumnParallelLinear | None:
        return self.mlm_decoder if self.mlm_decoder is not None else self.lm_head

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count of the whole model (all TP shards, tied weights once, no vocab padding)."""
        return count_parameters(self, trainable_only=trainable_only)


def count_parameters(model: GkdModel, trainable_only: bool = False) -> int:
    """Global parameter count of ``model``, independent of the TP size.

    Sharded parameters count ``tp`` times their local size (shards are equal); vocabulary
    padding rows are excluded; tied weights count once.
    """
    cfg = model.model_config
    tp = model.config.tensor_model_parallel_size
    pad_rows = model.padded_vocab_size - cfg.vocab_size
    total = 0
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        kind = shard_kind(name, cfg)
        n = p.numel() if kind is ShardKind.REPLICATED else p.numel() * tp
        if kind is ShardKind.VOCAB and pad_rows:
            n -= pad_rows * (p.numel() // p.size(0))
        total += n
    return total


def build_model(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    init_weights: bool = True,
    device: torch.device | str | None = None,
) -> GkdModel:
    """Build a model for the current tensor-parallel group.

    Initialises a single-process parallel state when none exists
    (:func:`gkd.parallel.ensure_initialized`), so this works in plain scripts and tests.

    Args:
        cfg: Architecture.
        seed: Seed of the random initialisation. The full weights are drawn on the CPU and
            sliced, so every TP size yields the same model; the global RNG is left untouched.
        init_weights: False skips random initialisation (weights are garbage until loaded).
        device: Target device; default CUDA when available, else CPU.
    """
    if not parallel.is_initialized():
        parallel.ensure_initialized(tp=1)
    else:
        parallel.apply_cpu_compat()
    tconfig = cfg.to_transformer_config(parallel.tp_world_size(), init_weights=init_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GkdModel(cfg, tconfig)
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return model.to(device)


__all__ = ["Embeddings", "ForwardOutput", "GkdModel", "build_model", "count_parameters"]
