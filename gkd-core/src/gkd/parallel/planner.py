"""The memory planner behind ``gkd plan``: per-GPU bytes of a distillation step for every layout
of tensor parallelism (TP) × data parallelism (DP) × ZeRO stage × optimizer offload × teacher
placement, predicted from the models' shapes alone (pure arithmetic: no torch, no model built).

What one GPU holds, per category (``E`` = bytes of the training precision, ``Ψ`` = student and
auxiliary parameters of this TP rank, ``N`` = DP size):

==============  ===============================================================================
category        model
==============  ===============================================================================
teachers        each teacher's TP shard in its dtype (``resident``); 1/N of it plus the largest
                unit gathered for the forward (``partition``: ``teachers[].partition:
                data_parallel``); with ``offload: cpu`` the shard (or the slices) sit in host
                memory and the forward brings the whole shard (or one unit) onto the GPU
student         ``Ψ·E``; under ZeRO-3 each parameter's ``1/N`` partition, the parameters DeepSpeed
                keeps whole (``stage3_param_persistence_threshold``, 1e5 elements) and, during
                forward and backward, the largest layer gathered
gradients       ``Ψ·E`` (ZeRO 0); ZeRO 1/2: the gradients of the parameters that overlap this
                rank's partition of DeepSpeed's flat groups (simulated, as DeepSpeed cuts them);
                ZeRO-3: ``Ψ/N``; with ``offload_optimizer`` an fp32 partition in host memory instead
                (ZeRO-3 keeps its ``Ψ/N`` buffer there too)
optimizer       AdamW's two fp32 moments, plus the fp32 master copy DeepSpeed keeps under ZeRO 1-3
                and whenever the precision is not fp32 (12 bytes/parameter, the ZeRO paper's
                K = 12 with the 2 + 2 bytes of 16-bit parameters and gradients: 16 bytes in all);
                ``1/N`` of it under ZeRO 1-3; host memory with ``offload_optimizer``
buffers         DeepSpeed's gradient reduction bucket (``reduce_bucket_size``, 5e8 elements, at
                most the parameters) under ZeRO 1-3; with ``offload_optimizer`` (ZeRO 1/2) its
                16-bit staging copy of the partition (host) and one parameter's gradient on each
                side of the copy
activations     what autograd saves for the student's backward pass (per layer, from the layer's
                operations: norms, projections, attention, MLP, dropout masks) plus the features
                and logits the methods are handed, for every model, and the saved tensors of the
                losses over them (:class:`ActivationModel`)
==============  ===============================================================================

The peak adds everything, as if the gradients, the teacher's forward and the activations were
alive at once (they nearly are: the teachers run while the student's activations are held, and
the gradients fill during the backward). It leaves out allocator fragmentation, the CUDA
context and the communication library's own buffers: ``reserve`` keeps room for them.

Parameter counts are exact for gkd's encoder (BERT) and decoder (Llama) models, shard by shard
(:func:`parameters`); ``tests/gkd/parallel/test_memory.py`` checks the predictions against the
bytes measured on real CPU runs (:mod:`gkd.parallel.memory`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GiB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's ``stage3_param_persistence_threshold``: ZeRO-3 keeps smaller parameters whole."""
REDUCE_BUCKET = 500_000_000
"""DeepSpeed's ``reduce_bucket_size`` (elements)."""
ADAM_MOMENT_BYTES = 8
MASTER_BYTES = 4

TeacherPlacement = Literal["resident", "partition", "cpu", "partition+cpu"]
TEACHER_PLACEMENTS: tuple[TeacherPlacement, ...] = ("resident", "partition", "cpu", "partition+cpu")
"""``resident``: ``partition: none, offload: none``; ``partition``: ``partition: data_parallel``;
``cpu``: ``offload: cpu``; ``partition+cpu``: both."""
PLACEMENT_CONFIG: dict[str, dict[str, str]] = {
    "resident": {"partition": "none", "offload": "none"},
    "partition": {"partition": "data_parallel", "offload": "none"},
    "cpu": {"partition": "none", "offload": "cpu"},
    "partition+cpu": {"partition": "data_parallel", "offload": "cpu"},
}


class PlanError(ValueError):
    """Input the planner cannot use (an unknown size, a shape that does not divide)."""


# ---------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Architecture:
    """The shape of a gkd model, as far as memory is concerned.

    ``encoder``: BERT (post-LayerNorm, learned positions, token types, GELU MLP with biases,
    pooler); ``decoder``: Llama (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases).
    """

    family: Literal["encoder", "decoder"]
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    head: str = "none"
    """``none``, ``lm`` (decoder), ``mlm`` or ``classification`` (encoder)."""
    num_labels: int = 2
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    tie_word_embeddings: bool = True
    add_pooler: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise PlanError(f"{name} ({getattr(self, name)}) must be positive")
        if self.kv_heads <= 0 or self.num_attention_heads % self.kv_heads:
            raise PlanError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_attention_heads

    @property
    def dim(self) -> int:
        """Per-head width."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def pooler(self) -> bool:
        return self.family == "encoder" and self.add_pooler

    @classmethod
    def from_model_config(cls, cfg: Any) -> Architecture:
        """The shape of a :class:`gkd.models.ModelConfig` (MobileBERT is not modelled)."""
        if getattr(cfg, "variant", "standard") != "standard":
            raise PlanError(f"the planner models standard encoders and decoders, not '{cfg.variant}'")
        return cls(cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size,
                   cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim, cfg.head, cfg.num_labels,
                   cfg.max_position_embeddings, cfg.type_vocab_size, cfg.tie_word_embeddings, cfg.add_pooler,
                   cfg.hidden_dropout, cfg.attention_dropout)

    def tp_problem(self, tp: int) -> str | None:
        """Why this model cannot be split over ``tp`` ranks (None: it can)."""
        if self.num_attention_heads % tp or self.kv_heads % tp:
            return f"{self.num_attention_heads} heads ({self.kv_heads} key/value) are not divisible by TP {tp}"
        if self.ffn_hidden_size % tp:
            return f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by TP {tp}"
        return None

    def num_parameters(self) -> int:
        """Parameters of the whole model (TP 1, unpadded vocabulary, tied weights once)."""
        return sum(p.numel for p in parameters(self, 1))


@dataclass(frozen=True)
class Param:
    """One parameter tensor of one TP rank."""

    name: str
    numel: int
    unit: str
    """``embeddings``, ``layers.{i}`` or ``head`` (what a partitioned teacher gathers together)."""


def parameters(arch: Architecture, tp: int) -> list[Param]:
    """This TP rank's parameters, in the order of ``model.named_parameters()`` (DeepSpeed flattens
    them in that order), with gkd's split rules (:mod:`gkd.models.sharding`)."""
    h, f, t = arch.hidden_size, arch.ffn_hidden_size, tp
    vocab_rows = -(-arch.vocab_size // t)  # the padded vocabulary's rows per rank
    q, kv = arch.num_attention_heads * arch.dim, arch.kv_heads * arch.dim
    enc = arch.family == "encoder"
    out = [Param("embeddings.word_embeddings.weight", vocab_rows * h, "embeddings")]
    if enc:
        out.append(Param("embeddings.position_embeddings.weight", arch.max_position_embeddings * h, "embeddings"))
        if arch.type_vocab_size:
            out.append(Param("embeddings.token_type_embeddings.weight", arch.type_vocab_size * h, "embeddings"))
        out += [Param("embeddings.norm.weight", h, "embeddings"), Param("embeddings.norm.bias", h, "embeddings")]
    for i in range(arch.num_layers):
        unit, p = f"layers.{i}", f"layers.{i}."
        layer = [Param(p + "attention_norm.weight", h, unit)]
        layer += [Param(p + "attention_norm.bias", h, unit)] if enc else []
        layer.append(Param(p + "self_attention.linear_proj.weight", h * q // t, unit))
        layer += [Param(p + "self_attention.linear_proj.bias", h, unit)] if enc else []
        layer.append(Param(p + "self_attention.linear_qkv.weight", (q + 2 * kv) // t * h, unit))
        layer += [Param(p + "self_attention.linear_qkv.bias", (q + 2 * kv) // t, unit)] if enc else []
        layer.append(Param(p + "mlp_norm.weight", h, unit))
        layer += [Param(p + "mlp_norm.bias", h, unit)] if enc else []
        layer.append(Param(p + "mlp.linear_fc1.weight", (f if enc else 2 * f) // t * h, unit))
        layer += [Param(p + "mlp.linear_fc1.bias", f // t, unit)] if enc else []
        layer.append(Param(p + "mlp.linear_fc2.weight", h * f // t, unit))
        layer += [Param(p + "mlp.linear_fc2.bias", h, unit)] if enc else []
        out += layer
    if not enc:
        out.append(Param("final_norm.weight", h, "head"))
    if arch.pooler:
        out += [Param("pooler.weight", h * h, "head"), Param("pooler.bias", h, "head")]
    if arch.head == "classification":
        out += [Param("classifier.weight", arch.num_labels * h, "head"), Param("classifier.bias", arch.num_labels, "head")]
    elif arch.head == "mlm":
        out += [Param("mlm_transform.weight", h * h, "head"), Param("mlm_transform.bias", h, "head"),
                Param("mlm_norm.weight", h, "head"), Param("mlm_norm.bias", h, "head")]
        if not arch.tie_word_embeddings:
            out.append(Param("mlm_decoder.weight", vocab_rows * h, "head"))
        out.append(Param("mlm_decoder.bias", vocab_rows, "head"))
    elif arch.head == "lm" and not arch.tie_word_embeddings:
        out.append(Param("lm_head.weight", vocab_rows * h, "head"))
    return out


def units(arch: Architecture, tp: int) -> dict[str, int]:
    """Elements per gather unit of a partitioned teacher; tied word embeddings are held with the
    head too (``shared`` in :mod:`gkd.parallel.teacher_partition`)."""
    sizes: dict[str, int] = {}
    for p in parameters(arch, tp):
        sizes[p.unit] = sizes.get(p.unit, 0) + p.numel
    if arch.tie_word_embeddings and arch.head in ("lm", "mlm"):
        sizes["head"] = sizes.get("head", 0) + parameters(arch, tp)[0].numel
    return sizes


# ---------------------------------------------------------------------------------- named sizes

SCALES: dict[str, tuple[int, int, int]] = {
    "125M": (12, 768, 12), "350M": (24, 1024, 16), "760M": (24, 1536, 16), "1.3B": (24, 2048, 16),
    "2.7B": (32, 2560, 32), "6.7B": (32, 4096, 32), "13B": (40, 5120, 40), "30B": (48, 7168, 56),
    "65B": (80, 8192, 64), "100B": (80, 10240, 80), "175B": (96, 12288, 96),
}
"""Named decoder scales: (layers, hidden size, heads) after GPT-3's table (Brown et al., 2020,
Table 2.1), plus 65B (LLaMA) and 100B. A size between them takes the width and heads of the
nearest one (in log scale) and as many layers as the size needs."""
DEFAULT_VOCAB = 50304
"""GPT-2's vocabulary padded to a multiple of 128."""
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMbBtT])$")
_SHAPE_KEYS = {"family", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "head", "labels", "positions",
               "tie", "dropout", "attention_dropout"}


def parse_count(text: str) -> int:
    """``"1.3B"`` → 1_300_000_000 (suffixes K, M, B, T)."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise PlanError(f"'{text}' is not a parameter count like 350M, 1.3B or 100B")
    return int(float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()])


def parse_bytes(text: str) -> int:
    """``"40GiB"``, ``"80GB"``, ``"40"`` (GiB) → bytes."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB|G|M|T)?\s*$", text, re.IGNORECASE)
    if m is None:
        raise PlanError(f"'{text}' is not a memory size like 40GiB or 80GB")
    unit = (m.group(2) or "GiB").lower()
    factor = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 1 << 20, "m": 1 << 20, "mb": 10**6, "tib": 1 << 40,
              "t": 1 << 40, "tb": 10**12}[unit]
    return int(float(m.group(1)) * factor)


def _swiglu_ffn(hidden: int) -> int:
    return -(-8 * hidden // 3 // 256) * 256  # 8h/3 rounded up to a multiple of 256, as Llama does


def architecture_from_spec(spec: str) -> Architecture:
    """A model from ``gkd plan --teacher/--student``: a size (``100B``), ``key=value`` pairs, or both.

    Keys: ``family`` (``decoder``), ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``ffn``
    (decoder: 8·hidden/3 rounded up to a multiple of 256, as Llama; encoder: 4·hidden), ``vocab``
    (50304), ``head`` (``lm`` for decoders, ``classification`` for encoders), ``labels``,
    ``positions`` (512), ``tie`` (1: the output layer shares the word embeddings, as in GPT-3 and
    BERT), ``dropout``, ``attention_dropout`` (0). Heads default to hidden/128 (decoders) or
    hidden/64 (encoders).

    A named scale (``1.3B``, ``100B``, :data:`SCALES`) is that decoder shape. Another size takes
    the width and heads of the nearest named scale and as many layers as the size needs; a size
    with ``hidden`` gives the layers, a size with ``layers`` the width (a multiple of 256).
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    size: int | None = None
    named: tuple[int, int, int] | None = None
    given: dict[str, str] = {}
    for part in parts:
        if "=" in part:
            key, _, value = (x.strip() for x in part.partition("="))
            if key not in _SHAPE_KEYS:
                raise PlanError(f"'{key}' in '{spec}' is not a model key (one of {', '.join(sorted(_SHAPE_KEYS))})")
            given[key] = value
        elif size is None:
            size = parse_count(part)
            named = next((v for k, v in SCALES.items() if k.lower() == part.lower()), None)
        else:
            raise PlanError(f"'{spec}' gives two sizes")

    def number(key: str, default: int | None = None) -> int | None:
        if key not in given:
            return default
        try:
            return int(given[key])
        except ValueError:
            raise PlanError(f"{key}={given[key]} in '{spec}' is not an integer") from None

    family = given.get("family", "decoder")
    if family not in ("encoder", "decoder"):
        raise PlanError(f"family={family} in '{spec}': expected encoder or decoder")
    layers, hidden, heads = number("layers"), number("hidden"), number("heads")

    encoder = family == "encoder"

    def build(n_layers: int, width: int, n_heads: int | None) -> Architecture:
        n_heads = n_heads or max(1, width // (64 if encoder else 128))
        try:
            return Architecture(family, n_layers, width, n_heads,  # type: ignore[arg-type]
                                number("ffn") or (4 * width if encoder else _swiglu_ffn(width)),
                                number("vocab", DEFAULT_VOCAB) or DEFAULT_VOCAB, number("kv_heads"), None,
                                given.get("head", "classification" if encoder else "lm"), number("labels", 2) or 2,
                                number("positions", 512) or 512, 2 if encoder else 0,
                                bool(number("tie", 1)), encoder,
                                float(given.get("dropout", 0.0)), float(given.get("attention_dropout", 0.0)))
        except ValueError as exc:
            raise PlanError(f"'{spec}': {exc}") from None

    if size is None:
        if layers is None or hidden is None:
            raise PlanError(f"'{spec}': give a size (350M, 1.3B, 100B) or layers=..,hidden=..")
        return build(layers, hidden, heads)
    if layers is not None and hidden is not None:
        raise PlanError(f"'{spec}': a size and both layers and hidden; give two of the three")
    if layers is None and hidden is None and named is not None and family == "decoder":
        return build(named[0], named[1], heads or named[2])
    if layers is None:
        if hidden is None:
            scale = min(SCALES.values(), key=lambda sc: abs(math.log(build(*sc).num_parameters() / size)))
            hidden, heads = scale[1], heads or scale[2]
        one, two = build(1, hidden, heads).num_parameters(), build(2, hidden, heads).num_parameters()
        return build(max(1, round((size - (2 * one - two)) / (two - one))), hidden, heads)
    width = 256
    while build(layers, width + 256, heads).num_parameters() <= size:
        width += 256
    return build(layers, width, heads)


# ---------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ModelUse:
    """How a model takes part in the step: its shape, the features the methods read from it,
    whether a soft loss reads its logits, and the dtype of its activations."""

    arch: Architecture
    features: frozenset[str] = frozenset()
    logits: bool = True
    dtype: str = "bf16"
    name: str = ""


@dataclass(frozen=True)
class ActivationModel:
    """Bytes of the tensors a forward pass keeps (per TP rank).

    ``kernel`` is where the step runs: ``cuda`` (fused attention keeps no ``s × s`` tensor even
    with dropout; dropout keeps a 1-byte mask) or ``cpu`` (PyTorch's CPU kernels: attention
    dropout falls back to the unfused attention, dropout keeps a mask in the activation dtype).
    """

    kernel: Literal["cuda", "cpu"] = "cuda"

    def student(self, use: ModelUse, tp: int, batch: int, seq: int) -> int:
        """Saved for the student's backward pass, plus the features not already saved."""
        a, e = use.arch, DTYPE_BYTES[use.dtype]
        mask = 1 if self.kernel == "cuda" else e
        tokens = batch * seq
        h, f_t = a.hidden_size, a.ffn_hidden_size // tp
        q_t, kv_t, n_t = a.num_attention_heads * a.dim // tp, a.kv_heads * a.dim // tp, a.num_attention_heads // tp
        square = batch * n_t * seq * seq  # one [b, heads/tp, s, s] tensor
        drop_h = tokens * h * mask if a.hidden_dropout > 0 else 0
        total = 3 * tokens * 8  # token ids saved by the embeddings (int64)
        if a.family == "encoder":
            total += tokens * h * e + 2 * tokens * 4 + drop_h  # embedding LayerNorm input and statistics
        for i in range(a.num_layers):
            eager = f"layers.{i}.attention.scores" in use.features or f"layers.{i}.attention.probs" in use.features
            qkv = tokens * (q_t + 2 * kv_t) * e
            context = tokens * q_t * e
            if a.family == "encoder":
                # qkv input, LayerNorm inputs (2), fc1 input; GELU input and fc2 input
                layer = 4 * tokens * h * e + 2 * tokens * f_t * e + 2 * 2 * tokens * 4 + qkv + context + 2 * drop_h
                causal_mask = 0
            else:
                # RMSNorm: input, normalised, scaled (2×); RoPE'd query and key; SwiGLU: fc1 out (2f),
                # SiLU out, up copy, fc2 input
                layer = 6 * tokens * h * e + 2 * tokens * e + tokens * (q_t + kv_t) * e + 5 * tokens * f_t * e
                layer += qkv + context + 2 * drop_h
                causal_mask = batch * seq * seq * e  # the additive [b, 1, s, s] mask of a padded batch
            if eager:
                if a.kv_heads != a.num_attention_heads:
                    layer += 2 * tokens * q_t * e  # keys and values repeated to every query head
                layer += square * e + batch * seq * (seq if a.family == "decoder" else 1)  # probabilities, mask
                if a.attention_dropout > 0:
                    layer += square * (mask + e)  # dropout mask, dropped probabilities
                if f"layers.{i}.attention.scores" in use.features:
                    layer += square * e  # the captured scores are kept for the method
            elif a.attention_dropout > 0 and self.kernel == "cpu":
                layer += square * (2 * e + mask) + causal_mask + tokens * q_t * e  # unfused: probs, dropped, mask
            else:
                layer += batch * n_t * seq * 4 + causal_mask  # log-sum-exp of the fused kernel
            total += layer
        total += self._head(a, tokens, batch, e, mask)
        return total

    def _head(self, a: Architecture, tokens: int, batch: int, e: int, mask: int) -> int:
        h = a.hidden_size
        if a.family == "decoder":
            return 3 * tokens * h * e + tokens * e  # final RMSNorm (its output is the LM head's input)
        total = tokens * h * e  # the last layer's output (the pooler / MLM transform reads it)
        if a.head == "classification":
            total += 3 * batch * h * e + (batch * h * mask if a.hidden_dropout > 0 else 0)
        elif a.head == "mlm":
            total += 3 * tokens * h * e + 2 * tokens * 4
        return total

    def logits(self, use: ModelUse, tp: int, batch: int, seq: int) -> int:
        """The gathered logits a model hands the methods (every TP rank holds all of them)."""
        a = use.arch
        if a.head in ("lm", "mlm"):
            padded = -(-a.vocab_size // tp) * tp
            return batch * seq * padded * DTYPE_BYTES[use.dtype]
        if a.head == "classification":
            return batch * a.num_labels * DTYPE_BYTES[use.dtype]
        return 0

    def teacher_features(self, use: ModelUse, tp: int, batch: int, seq: int) -> int:
        """The features of a teacher run without autograd: only what the methods read is kept."""
        return sum(feature_bytes(use.arch, name, tp, batch, seq, DTYPE_BYTES[use.dtype]) for name in use.features)


def feature_bytes(arch: Architecture, name: str, tp: int, batch: int, seq: int, e: int) -> int:
    """Bytes of one captured feature (:mod:`gkd.models.taps`) on one TP rank."""
    role = name.split(".", 2)[2] if name.startswith("layers.") else name
    tokens = batch * seq
    if role in ("input", "output", "embeddings", "final_norm"):
        return tokens * arch.hidden_size * e
    if role in ("attention.scores", "attention.probs"):
        return batch * arch.num_attention_heads // tp * seq * seq * e
    if role in ("attention.query", "attention.context"):
        return tokens * arch.num_attention_heads * arch.dim // tp * e
    if role in ("attention.key", "attention.value"):
        return tokens * arch.kv_heads * arch.dim // tp * e
    if role == "ffn.intermediate":
        return tokens * arch.ffn_hidden_size // tp * e
    if role == "pooled":
        return batch * arch.hidden_size * e
    return 0  # logits: counted with the model's logits


def loss_bytes(student: ModelUse, teachers: Sequence[ModelUse], tp: int, batch: int, seq: int, *,
               hard_loss: bool = True) -> int:
    """What the losses save for the backward pass, in fp32.

    * two log-probability tensors over the student's logits for the hard loss when a method reads
      it (the step takes the batch mean and the per-example means), two per soft loss (the student's
      log-probabilities and the teacher's probabilities they are weighted with);
    * per compared attention feature (scores, probabilities, or the query/key/value relations
      ``softmax(x·xᵀ)`` of MiniLM-style methods): the same two ``[b, heads, s, s]`` tensors and
      the boolean mask of valid positions;
    * per compared hidden state: one tensor of its size (the difference of an MSE, or a
      projection's output).
    """
    logits = ActivationModel().logits(replace(student, dtype="fp32"), tp, batch, seq)
    soft = sum(1 for t in teachers if t.logits)
    total = logits * 2 * (int(hard_loss) + soft)
    a = student.arch
    for name in student.features:
        if name.rsplit(".", 1)[-1] in ("scores", "probs", "query", "key", "value"):
            total += 2 * batch * a.num_attention_heads // tp * seq * seq * 4 + batch * seq * seq
        else:
            total += feature_bytes(a, name, tp, batch, seq, 4)
    return total


# ---------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """One way to run the step on ``tp × dp`` GPUs."""

    tp: int
    dp: int
    zero: int
    offload_optimizer: bool = False
    teacher: TeacherPlacement = "resident"

    def label(self) -> str:
        return (f"TP{self.tp} DP{self.dp} ZeRO-{self.zero}{' +offload' if self.offload_optimizer else ''} "
                f"teacher:{self.teacher}")

    def config(self) -> dict[str, Any]:
        """The run-config fields of this layout."""
        return {"parallel": {"tensor_parallel": self.tp,
                             "zero": {"stage": self.zero, "offload_optimizer": self.offload_optimizer}},
                "teachers[]": dict(PLACEMENT_CONFIG[self.teacher])}


@dataclass(frozen=True)
class Workload:
    """What one step of one stage runs."""

    student: ModelUse
    teachers: tuple[ModelUse, ...] = ()
    auxiliary_parameters: int = 0
    """The methods' trainable parameters (replicated on every TP rank)."""
    precision: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 512
    name: str = "stage"
    trains: str = "student"
    """What the optimizer updates: ``student``, or ``teacher 'NAME'`` (a fine-tuning stage)."""
    hard_loss: bool = True
    """Whether the student's hard loss is computed (plain training, or a method claiming
    ``hard_loss``): the step computes it only when a method reads it."""


@dataclass
class Estimate:
    """Predicted bytes per GPU (``device``) and per GPU's share of host memory (``host``)."""

    layout: Layout
    teachers: int = 0
    teachers_host: int = 0
    student: int = 0
    gradients: int = 0
    gradients_host: int = 0
    optimizer: int = 0
    optimizer_host: int = 0
    buffers: int = 0
    buffers_host: int = 0
    activations: int = 0
    gathered: int = 0
    """Transient: parameters gathered for a forward (ZeRO-3 student layer, partitioned teacher unit)."""
    stage: str = ""

    @property
    def model_states(self) -> int:
        return self.student + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return (self.teachers + self.student + self.gradients + self.optimizer + self.buffers + self.activations
                + self.gathered)

    @property
    def host(self) -> int:
        return self.teachers_host + self.gradients_host + self.optimizer_host + self.buffers_host

    def to_dict(self) -> dict[str, Any]:
        fields = ("teachers", "teachers_host", "student", "gradients", "gradients_host", "optimizer",
                  "optimizer_host", "buffers", "buffers_host", "activations", "gathered")
        return {"layout": {"tp": self.layout.tp, "dp": self.layout.dp, "zero": self.layout.zero,
                           "offload_optimizer": self.layout.offload_optimizer, "teacher": self.layout.teacher},
                "stage": self.stage, **{k: getattr(self, k) for k in fields}, "peak": self.peak, "host": self.host}


def _flat_groups(params: Sequence[int], dims: Sequence[int]) -> list[list[int]]:
    """The two AdamW groups of :func:`gkd.parallel.zero.param_groups` (decay: ≥ 2-D; no decay: 1-D)."""
    decay = [n for n, d in zip(params, dims, strict=True) if d >= 2]
    no_decay = [n for n, d in zip(params, dims, strict=True) if d < 2]
    return [g for g in (decay, no_decay) if g]


def zero12_gradient_elements(groups: Sequence[Sequence[int]], dp: int) -> int:
    """Gradient elements the busiest rank keeps under ZeRO 1/2: DeepSpeed pads each flat group
    to a multiple of 2·DP, cuts it into DP equal partitions and keeps, per rank, the whole
    gradient of every parameter that overlaps its partition."""
    per_rank = [0] * dp
    for group in groups:
        total = sum(group)
        padded = -(-total // (2 * dp)) * 2 * dp
        size = padded // dp
        start = 0
        for n in group:
            first, last = start // size, (start + n - 1) // size
            for r in range(first, min(last, dp - 1) + 1):
                per_rank[r] += n
            start += n
    return max(per_rank)


def _partition(numel: int, dp: int) -> int:
    return -(-numel // dp)


def estimate(work: Workload, layout: Layout, kernel: Literal["cuda", "cpu"] = "cuda") -> Estimate:
    """Predicted per-GPU bytes of ``work`` under ``layout``."""
    tp, dp, zero = layout.tp, layout.dp, layout.zero
    e = DTYPE_BYTES[work.precision]
    est = Estimate(layout, stage=work.name)
    # ---- teachers
    placement = layout.teacher
    held = []
    for t in work.teachers:
        te = DTYPE_BYTES[t.dtype]
        params = parameters(t.arch, tp)
        shard = sum(p.numel for p in params) * te
        stored: dict[str, int] = {}  # each parameter once, in the unit that stores it
        for p in params:
            stored[p.unit] = stored.get(p.unit, 0) + p.numel
        slices = sum(_partition(n, dp) for n in stored.values()) * te
        unit = max(units(t.arch, tp).values()) * te
        if placement == "resident":
            est.teachers += shard
        elif placement == "partition":
            est.teachers += slices
            held.append(unit)
        elif placement == "cpu":
            est.teachers_host += shard
            held.append(shard)  # the whole shard comes onto the GPU for the forward
        else:
            est.teachers_host += slices
            held.append(unit)
    est.gathered = max(held, default=0)  # teachers run one after the other
    # ---- student and auxiliary parameters
    params = parameters(work.student.arch, tp)
    numels = [p.numel for p in params] + ([work.auxiliary_parameters] if work.auxiliary_parameters else [])
    dims = [1 if ("norm" in p.name or p.name.endswith("bias")) else 2 for p in params] + [2] * bool(
        work.auxiliary_parameters)
    psi = sum(numels)
    if zero == 3:
        persistent = sum(n for n in numels if n <= PERSISTENCE_THRESHOLD)
        est.student = (sum(_partition(n, dp) for n in numels) + (persistent if dp > 1 else 0)) * e
        layer = max((sum(p.numel for p in params if p.unit == u) for u in {p.unit for p in params}), default=0)
        est.gathered = max(est.gathered, layer * e if dp > 1 else 0)
    else:
        est.student = psi * e
    # ---- gradients
    if zero == 0:
        grads = psi * e
    elif zero in (1, 2):
        grads = zero12_gradient_elements(_flat_groups(numels, dims), dp) * e
    else:
        grads = sum(_partition(n, dp) for n in numels) * e
    part = sum(_partition(n, dp) for n in numels) if zero == 3 else -(-sum(numels) // dp)
    # ---- optimizer states (and the fp32 master copy)
    master = MASTER_BYTES if (zero > 0 or work.precision != "fp32") else 0
    states = (psi if zero == 0 else part) * (ADAM_MOMENT_BYTES + master)
    if layout.offload_optimizer:
        est.optimizer_host = states
        est.gradients_host = part * 4  # the fp32 gradient partition sits next to the optimizer
        est.buffers = min(REDUCE_BUCKET, psi) * e
        if zero == 3:
            est.gradients_host += part * e  # ZeRO-3 also keeps its gradient partitions on the optimizer's device
        else:
            # the 16-bit staging copy of the partition; one parameter's gradient on each side of the copy
            largest = max(numels)
            est.buffers_host = (part + largest) * e
            est.buffers += largest * e
    else:
        est.optimizer = states
        est.gradients = grads
        est.buffers = min(REDUCE_BUCKET, psi) * e if zero > 0 else 0
    # ---- activations
    model = ActivationModel(kernel)
    b, s = work.micro_batch, work.seq_len
    student = replace(work.student, dtype=work.precision)
    est.activations = model.student(student, tp, b, s) + model.logits(student, tp, b, s)
    for t in work.teachers:
        est.activations += model.teacher_features(t, tp, b, s) + model.logits(t, tp, b, s)  # produced even if unread
    est.activations += loss_bytes(student, work.teachers, tp, b, s, hard_loss=work.hard_loss)
    return est


def layouts(gpus_per_node: int, nodes: int, archs: Iterable[Architecture], *, has_teachers: bool) -> list[Layout]:
    """Every layout of ``gpus_per_node × nodes`` GPUs: TP a divisor of the GPUs of one node that
    splits every model, DP the rest; ZeRO 0-3; optimizer offload (ZeRO 1-3: DeepSpeed's
    ZeRO-Offload); each teacher placement (partitions only with DP > 1)."""
    archs = list(archs)
    out = []
    for tp in (d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0):
        if any(a.tp_problem(tp) for a in archs):
            continue
        dp = gpus_per_node * nodes // tp
        for zero in range(4):
            for offload in (False, True) if zero else (False,):
                for teacher in TEACHER_PLACEMENTS if has_teachers else ("resident",):
                    if "partition" in teacher and dp == 1:
                        continue
                    out.append(Layout(tp, dp, zero, offload, teacher))
    return out


def recommendation_key(layout: Layout) -> tuple[int, ...]:
    """The order of the paper's advice (GKD, App. B.2): ZeRO first, then more tensor parallelism,
    then offload. Within it, lower ZeRO stages and whole teachers come first (less communication);
    partitioning a teacher over DP ranks (ZeRO-3 for inference) counts as a ZeRO step."""
    offloads = int(layout.offload_optimizer) + int("cpu" in layout.teacher)
    return (offloads, int("cpu" in layout.teacher), layout.tp, layout.zero + 2 * ("partition" in layout.teacher),
            int("partition" in layout.teacher))


@dataclass
class Plan:
    """Every layout's estimate (the worst stage each), what fits, and the recommendation."""

    gpus: int
    gpu_memory: int
    reserve: int
    estimates: list[Estimate]
    host_memory: int | None = None
    """Host memory per GPU's share, when given (a node's memory / its GPUs)."""
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.gpu_memory - self.reserve

    def fits(self, est: Estimate) -> bool:
        return est.peak <= self.usable and (self.host_memory is None or est.host <= self.host_memory)

    @property
    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if self.fits(e)]

    @property
    def recommended(self) -> Estimate | None:
        """The first layout that fits in the order of :func:`recommendation_key`."""
        return min(self.fitting, key=lambda e: recommendation_key(e.layout), default=None)

    @property
    def recommended_whole_teachers(self) -> Estimate | None:
        """:attr:`recommended` among the layouts that keep every teacher's TP shard on each rank
        (the paper's strategy: no partition over DP ranks, no offload of the teachers)."""
        whole = [e for e in self.fitting if e.layout.teacher == "resident"]
        return min(whole, key=lambda e: recommendation_key(e.layout), default=None)

    @property
    def shortfall(self) -> int:
        """Bytes the best layout lacks per GPU (0 when one fits)."""
        return 0 if self.fitting else min(e.peak for e in self.estimates) - self.usable

    def sorted(self) -> list[Estimate]:
        return sorted(self.estimates, key=lambda e: (e.peak, recommendation_key(e.layout)))


def plan(workloads: Sequence[Workload], *, gpus_per_node: int, nodes: int = 1, gpu_memory: int,
         reserve: int = GiB, host_memory_per_node: int | None = None,
         kernel: Literal["cuda", "cpu"] = "cuda") -> Plan:
    """Estimate every layout for every workload (stage) and keep, per layout, the stage with
    the highest peak."""
    if gpus_per_node < 1 or nodes < 1:
        raise PlanError("--gpus and --nodes must be at least 1")
    archs = [w.student.arch for w in workloads] + [t.arch for w in workloads for t in w.teachers]
    candidates = layouts(gpus_per_node, nodes, archs, has_teachers=any(w.teachers for w in workloads))
    worst = []
    for layout in candidates:
        estimates = [estimate(w, layout, kernel) for w in workloads]
        worst.append(max(estimates, key=lambda e: e.peak))
    host = None if host_memory_per_node is None else host_memory_per_node // gpus_per_node
    return Plan(gpus_per_node * nodes, gpu_memory, reserve, worst, host)


__all__ = ["DTYPE_BYTES", "PLACEMENT_CONFIG", "SCALES", "TEACHER_PLACEMENTS", "ActivationModel", "Architecture",
           "Estimate", "GiB", "Layout", "ModelUse", "Param", "Plan", "PlanError", "Workload",
           "architecture_from_spec", "estimate", "feature_bytes", "layouts", "loss_bytes", "parameters",
           "parse_bytes", "parse_count", "plan", "recommendation_key", "units", "zero12_gradient_elements"]
