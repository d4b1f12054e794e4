"""Hugging Face checkpoints in and out, without ``transformers`` at run time.

In: ``config.json`` → :class:`ModelConfig`; ``model.safetensors`` (or a sharded index) →
weights, each TP rank keeping only its slice. Out: :func:`export_hf` writes
``model.safetensors`` + ``config.json`` (+ tokenizer files) that ``transformers`` loads as
``BertModel`` / ``BertForSequenceClassification`` / ``BertForMaskedLM`` / ``MobileBertModel`` /
``MobileBertForSequenceClassification`` / ``MobileBertForMaskedLM`` / ``LlamaModel`` /
``LlamaForCausalLM``; under TP the shards are merged and global rank 0 writes. Every file is
written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gkd import parallel
from gkd.atomic import atomic_write
from gkd.config.paths import PathResolutionError, resolve_path
from gkd.errors import GkdError
from gkd.models.config import HeadKind, ModelConfig
from gkd.models.model import GkdModel, build_model
from gkd.models.sharding import ShardKind, gather_full, shard_kind

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
"""Tokenizer files copied by :func:`export_hf` when present in ``tokenizer_dir``."""

HEAD_PARAMETER_PREFIXES: tuple[str, ...] = ("pooler.", "classifier.", "mlm_", "lm_head.")
"""gkd parameters that belong to a head (may be absent from a backbone-only checkpoint)."""

WEIGHT_FILES = "model.safetensors (or a sharded model.safetensors.index.json)"
"""What gkd reads weights from; ``pytorch_model.bin`` is never unpickled."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``owner/name`` as the Hugging Face hub spells model ids."""


class MissingCheckpointError(GkdError, FileNotFoundError):
    """A checkpoint directory, or a file gkd reads from it, does not exist (one line)."""


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a local Hugging Face checkpoint directory holding ``config.json``.

    ``pkg:module/sub`` points into an installed package (as in run configs); ``~`` expands.

    Raises:
        MissingCheckpointError: The directory or its ``config.json`` does not exist (a hub
            id such as ``owner/name`` gets a hint to download it first) or a package is
            not installed.
    """
    text = os.fspath(path)
    try:
        resolved = resolve_path(text, Path())
    except PathResolutionError as exc:
        raise MissingCheckpointError(f"checkpoint {text!r}: {exc}") from None
    expected = f"expected config.json and {WEIGHT_FILES} in it"
    if not resolved.exists():
        if _HUB_ID.fullmatch(text):
            raise MissingCheckpointError(
                f"checkpoint {text!r} does not exist: gkd loads local Hugging Face directories, not hub ids; "
                f"download the model first (e.g. huggingface-cli download {text} --local-dir DIR) and pass "
                f"DIR; {expected}"
            )
        raise MissingCheckpointError(f"checkpoint directory {text!r} does not exist; {expected}")
    if not (resolved / "config.json").is_file():
        raise MissingCheckpointError(f"checkpoint {text!r} has no config.json; {expected}")
    return resolved


# --------------------------------------------------------------------------- sources
class TensorSource(Protocol):
    """Read access to named full tensors (a checkpoint directory or an in-memory dict)."""

    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``get(name)`` restricted to ``start:stop`` along ``dim`` (0 or 1)."""
        ...


class SafetensorsDir:
    """Lazily reads tensors from ``model.safetensors`` or ``model.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if single.is_file():
            self._files = {name: single for name in self._names(single)}
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            raise MissingCheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {self.path} "
                "(gkd reads safetensors only; convert a pytorch_model.bin checkpoint first)"
            )
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _names(file: Path) -> list[str]:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())

    def keys(self) -> Iterable[str]:
        return self._files.keys()

    def _handle(self, name: str) -> Any:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        # safetensors reads only the requested rows/columns from the file.
        part = self._handle(name).get_slice(name)
        return part[start:stop] if dim == 0 else part[:, start:stop]


class DictSource:
    """A :class:`TensorSource` over a dict of tensors (e.g. :func:`hf_state_dict` output)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].narrow(dim, start, stop - start)


# --------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class _Entry:
    """One gkd parameter ↔ one or more HF tensors."""

    gkd: str
    hf: tuple[str, ...]
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    vocab_dim: int = 0
    """Dimension of the HF tensor(s) that runs over the vocabulary (vocabulary-parallel parameters)."""


def _single(gkd: str, hf: str) -> _Entry:
    return _Entry(gkd, (hf,), lambda ts: ts[0], lambda t: [t])


def _qkv(gkd: str, hf: tuple[str, str, str], cfg: ModelConfig) -> _Entry:
    """megatron's fused QKV: for each query group g, ``[q heads of g; k_g; v_g]`` (rows)."""
    groups, d = cfg.kv_heads, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = ts
        tail = q.shape[1:]
        n = k.shape[0] // d  # all groups, or this rank's groups when joining TP slices
        return torch.cat(
            [q.reshape(n, per_group * d, *tail), k.reshape(n, d, *tail), v.reshape(n, d, *tail)], dim=1
        ).reshape(n * (per_group + 2) * d, *tail)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        tail = t.shape[1:]
        q, k, v = t.reshape(groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]

    return _Entry(gkd, hf, join, split)


def _transposed(gkd: str, hf: str) -> _Entry:
    """A gkd ``[V, n]`` parameter stored by HF as ``[n, V]`` (MobileBERT's ``cls.predictions.dense``)."""
    return _Entry(gkd, (hf,), lambda ts: ts[0].t().contiguous(), lambda t: [t.t()], vocab_dim=1)


def _glu(gkd: str, gate: str, up: str) -> _Entry:
    return _Entry(gkd, (gate, up), lambda ts: torch.cat(ts, dim=0), lambda t: list(t.chunk(2, dim=0)))


def hf_prefix(cfg: ModelConfig) -> str:
    """Prefix of backbone keys in the HF class :meth:`ModelConfig.to_hf_config` names."""
    if cfg.family == "encoder":
        return "" if cfg.head == "none" else ("mobilebert." if cfg.is_mobilebert else "bert.")
    return "model." if cfg.head == "lm" else ""


def _mobilebert_entries(cfg: ModelConfig, p: str) -> list[_Entry]:
    """MobileBERT (transformers' ``MobileBert*``) names; see :mod:`gkd.models.bottleneck`."""
    pairs = [
        ("embeddings.word_embeddings.weight", f"{p}embeddings.word_embeddings.weight"),
        ("embeddings.position_embeddings.weight", f"{p}embeddings.position_embeddings.weight"),
        ("embeddings.token_type_embeddings.weight", f"{p}embeddings.token_type_embeddings.weight"),
        ("pooler.weight", f"{p}pooler.dense.weight"),
        ("pooler.bias", f"{p}pooler.dense.bias"),
        ("classifier.weight", "classifier.weight"),
        ("classifier.bias", "classifier.bias"),
        # transformers ties decoder.bias to cls.predictions.bias only with tied embeddings, and
        # its forward adds decoder.bias.
        (
            "mlm_decoder.bias",
            "cls.predictions.bias" if cfg.tie_word_embeddings else "cls.predictions.decoder.bias",
        ),
        ("mlm_word_decoder.weight", "cls.predictions.decoder.weight"),
    ]
    for w in ("weight", "bias"):
        pairs += [
            (f"embeddings.embedding_transformation.{w}", f"{p}embeddings.embedding_transformation.{w}"),
            (f"embeddings.norm.{w}", f"{p}embeddings.LayerNorm.{w}"),
            (f"mlm_transform.{w}", f"cls.predictions.transform.dense.{w}"),
            (f"mlm_norm.{w}", f"cls.predictions.transform.LayerNorm.{w}"),
        ]
        for i in range(cfg.num_layers):
            g, h = f"layers.{i}.", f"{p}encoder.layer.{i}."
            pairs += [
                (f"{g}bottleneck_input.{w}", f"{h}bottleneck.input.dense.{w}"),
                (f"{g}bottleneck_input_norm.{w}", f"{h}bottleneck.input.LayerNorm.{w}"),
                (f"{g}bottleneck_attention.{w}", f"{h}bottleneck.attention.dense.{w}"),
                (f"{g}bottleneck_attention_norm.{w}", f"{h}bottleneck.attention.LayerNorm.{w}"),
                (f"{g}self_attention.linear_q.{w}", f"{h}attention.self.query.{w}"),
                (f"{g}self_attention.linear_k.{w}", f"{h}attention.self.key.{w}"),
                (f"{g}self_attention.linear_v.{w}", f"{h}attention.self.value.{w}"),
                (f"{g}self_attention.linear_proj.{w}", f"{h}attention.output.dense.{w}"),
                (f"{g}attention_norm.{w}", f"{h}attention.output.LayerNorm.{w}"),
                (f"{g}mlp.linear_fc1.{w}", f"{h}intermediate.dense.{w}"),
                (f"{g}mlp.linear_fc2.{w}", f"{h}output.dense.{w}"),
                (f"{g}mlp_norm.{w}", f"{h}output.LayerNorm.{w}"),
                (f"{g}output_bottleneck.{w}", f"{h}output.bottleneck.dense.{w}"),
                (f"{g}output_norm.{w}", f"{h}output.bottleneck.LayerNorm.{w}"),
            ]
            for j in range(cfg.num_feedforward_networks - 1):
                pairs += [
                    (f"{g}ffns.{j}.linear_fc1.{w}", f"{h}ffn.{j}.intermediate.dense.{w}"),
                    (f"{g}ffns.{j}.linear_fc2.{w}", f"{h}ffn.{j}.output.dense.{w}"),
                    (f"{g}ffn_norms.{j}.{w}", f"{h}ffn.{j}.output.LayerNorm.{w}"),
                ]
    return [_single(g, h) for g, h in pairs] + [
        _transposed("mlm_dense.weight", "cls.predictions.dense.weight")
    ]


def _entries(cfg: ModelConfig, prefix: str) -> dict[str, _Entry]:
    p = prefix
    out: list[_Entry] = []
    if cfg.is_mobilebert:
        out += _mobilebert_entries(cfg, p)
    elif cfg.family == "encoder":
        out += [
            _single("embeddings.word_embeddings.weight", f"{p}embeddings.word_embeddings.weight"),
            _single("embeddings.position_embeddings.weight", f"{p}embeddings.position_embeddings.weight"),
            _single("embeddings.token_type_embeddings.weight", f"{p}embeddings.token_type_embeddings.weight"),
            _single("embeddings.norm.weight", f"{p}embeddings.LayerNorm.weight"),
            _single("embeddings.norm.bias", f"{p}embeddings.LayerNorm.bias"),
            _single("pooler.weight", f"{p}pooler.dense.weight"),
            _single("pooler.bias", f"{p}pooler.dense.bias"),
            _single("classifier.weight", "classifier.weight"),
            _single("classifier.bias", "classifier.bias"),
            _single("mlm_transform.weight", "cls.predictions.transform.dense.weight"),
            _single("mlm_transform.bias", "cls.predictions.transform.dense.bias"),
            _single("mlm_norm.weight", "cls.predictions.transform.LayerNorm.weight"),
            _single("mlm_norm.bias", "cls.predictions.transform.LayerNorm.bias"),
            _single("mlm_decoder.bias", "cls.predictions.bias"),
            _single("mlm_decoder.weight", "cls.predictions.decoder.weight"),
        ]
        for i in range(cfg.num_layers):
            g, h = f"layers.{i}.", f"{p}encoder.layer.{i}."
            for w in ("weight", "bias"):
                out += [
                    _qkv(
                        f"{g}self_attention.linear_qkv.{w}",
                        tuple(f"{h}attention.self.{n}.{w}" for n in ("query", "key", "value")),
                        cfg,
                    ),  # type: ignore[arg-type]
                    _single(f"{g}self_attention.linear_proj.{w}", f"{h}attention.output.dense.{w}"),
                    _single(f"{g}attention_norm.{w}", f"{h}attention.output.LayerNorm.{w}"),
                    _single(f"{g}mlp.linear_fc1.{w}", f"{h}intermediate.dense.{w}"),
                    _single(f"{g}mlp.linear_fc2.{w}", f"{h}output.dense.{w}"),
                    _single(f"{g}mlp_norm.{w}", f"{h}output.LayerNorm.{w}"),
                ]
    else:
        out += [
            _single("embeddings.word_embeddings.weight", f"{p}embed_tokens.weight"),
            _single("final_norm.weight", f"{p}norm.weight"),
            _single("lm_head.weight", "lm_head.weight"),
        ]
        for i in range(cfg.num_layers):
            g, h = f"layers.{i}.", f"{p}layers.{i}."
            out += [
                _single(f"{g}attention_norm.weight", f"{h}input_layernorm.weight"),
                _qkv(
                    f"{g}self_attention.linear_qkv.weight",
                    tuple(f"{h}self_attn.{n}_proj.weight" for n in "qkv"),
                    cfg,
                ),  # type: ignore[arg-type]
                _single(f"{g}self_attention.linear_proj.weight", f"{h}self_attn.o_proj.weight"),
                _single(f"{g}mlp_norm.weight", f"{h}post_attention_layernorm.weight"),
                _glu(f"{g}mlp.linear_fc1.weight", f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                _single(f"{g}mlp.linear_fc2.weight", f"{h}mlp.down_proj.weight"),
            ]
    return {e.gkd: e for e in out}


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """HF keys that carry no weights gkd needs (buffers, tied duplicates)."""
    if name.endswith(("embeddings.position_ids", "rotary_emb.inv_freq")):
        return True
    if cfg.is_mobilebert and not cfg.tie_word_embeddings:
        if name == "cls.predictions.bias":  # untied MobileBERT: unused by transformers' forward
            return True
    elif name == "cls.predictions.decoder.bias":  # the same tensor as cls.predictions.bias
        return True
    return cfg.tie_word_embeddings and name in ("lm_head.weight", "cls.predictions.decoder.weight")


def detect_hf_prefix(cfg: ModelConfig, names: Iterable[str]) -> str:
    """Backbone key prefix of an HF checkpoint (``""``, ``"bert."``, ``"model."``)."""
    names = set(names)
    probe = "embeddings.word_embeddings.weight" if cfg.family == "encoder" else "embed_tokens.weight"
    for prefix in ("", "bert.", "mobilebert.", "model.", "transformer."):
        if prefix + probe in names:
            return prefix
    raise KeyError(f"checkpoint has no {probe!r} under any known prefix; is it a {cfg.family} checkpoint?")


# --------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_hf_weights` did."""

    loaded: list[str] = field(default_factory=list)
    """gkd parameters overwritten from the checkpoint."""
    missing: list[str] = field(default_factory=list)
    """gkd parameters the checkpoint did not provide (left as they were)."""
    unexpected: list[str] = field(default_factory=list)
    """checkpoint tensors that no gkd parameter used."""


def _read_local(
    src: TensorSource,
    name: str,
    kind: ShardKind,
    rank: int,
    tp: int,
    local_shape: torch.Size | tuple[int, ...],
    vocab_size: int,
    vocab_dim: int = 0,
) -> torch.Tensor:
    """This rank's part of one HF tensor, reading no more of it than that part.

    Every sharded HF tensor splits into ``tp`` equal blocks along one dimension — rows for
    column-parallel, GLU (gate and up separately), QKV (q, k, v separately: rank r's blocks
    are its query groups) and vocabulary tensors, columns for row-parallel ones — and the
    gkd parameter is the join of block ``r`` of each. Vocabulary blocks are cut from the
    padded row range (along ``vocab_dim`` of the HF tensor, whose local shape is
    ``local_shape``) and padded with zeros.
    """
    if kind is ShardKind.VOCAB and src.shape(name)[vocab_dim] != vocab_size:
        raise ValueError(
            f"{name}: checkpoint has {src.shape(name)[vocab_dim]} vocabulary rows, the model {vocab_size}"
        )
    if tp == 1 or kind is ShardKind.REPLICATED:
        return src.get(name)
    if kind is ShardKind.VOCAB:
        rows, total = local_shape[vocab_dim], vocab_size
        start = rank * rows
        stop = min(start + rows, total)
        part = src.get_part(name, vocab_dim, start, stop) if start < total else None
        have = 0 if part is None else part.shape[vocab_dim]
        if part is not None and have == rows:
            return part
        pad_shape = list(local_shape)
        pad_shape[vocab_dim] = rows - have
        pad = torch.zeros(pad_shape, dtype=torch.float32 if part is None else part.dtype)
        return pad if part is None else torch.cat([part, pad], dim=vocab_dim)
    dim = 1 if kind is ShardKind.ROW else 0
    size = src.shape(name)[dim]
    if size % tp:
        raise ValueError(f"{name}: dimension {dim} of size {size} cannot be split over tp={tp}")
    block = size // tp
    return src.get_part(name, dim, rank * block, (rank + 1) * block)


def load_hf_weights(
    model: GkdModel, source: str | os.PathLike[str] | TensorSource, *, strict: bool = True
) -> LoadReport:
    """Copy HF-format weights into ``model``; each TP rank keeps only its slice.

    Args:
        model: Target model (its shapes decide what is expected).
        source: A checkpoint directory or a :class:`TensorSource`.
        strict: Raise when a parameter is missing or a checkpoint tensor is unused.

    Raises:
        KeyError: ``strict`` and the key sets differ.
        ValueError: A tensor's shape does not match the model's.
    """
    src = SafetensorsDir(source) if isinstance(source, (str, os.PathLike)) else source
    cfg = model.model_config
    tp, rank = model.config.tensor_model_parallel_size, parallel.tp_rank()
    names = set(src.keys())
    entries = _entries(cfg, detect_hf_prefix(cfg, names))
    report, used = LoadReport(), set()
    for name, param in model.named_parameters():
        entry = entries.get(name)
        if entry is None:
            raise KeyError(f"gkd parameter {name!r} has no HF mapping")
        if not all(n in names for n in entry.hf):
            report.missing.append(name)
            continue
        kind = shard_kind(name, cfg)
        hf_shape = tuple(param.shape) if entry.vocab_dim == 0 else tuple(reversed(param.shape))
        local = entry.join(
            [_read_local(src, n, kind, rank, tp, hf_shape, cfg.vocab_size, entry.vocab_dim) for n in entry.hf]
        )
        if local.shape != param.shape:
            raise ValueError(
                f"{name}: checkpoint tensor(s) {list(entry.hf)} give local shape {tuple(local.shape)}, "
                f"model expects {tuple(param.shape)} (tp={tp})"
            )
        with torch.no_grad():
            param.copy_(local)
        used.update(entry.hf)
        report.loaded.append(name)
    report.unexpected = sorted(n for n in names - used if not _ignorable(n, cfg))
    if strict and (report.missing or report.unexpected):
        raise KeyError(
            f"checkpoint does not match the model: missing {report.missing}, unexpected {report.unexpected}"
        )
    return report


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``config.json`` of a checkpoint directory (``pkg:`` paths: :func:`checkpoint_dir`)."""
    return json.loads((checkpoint_dir(path) / "config.json").read_text())


def load_model_config(
    path: str | os.PathLike[str], *, head: HeadKind | None = None, **overrides: Any
) -> ModelConfig:
    """:meth:`ModelConfig.from_hf_config` on a checkpoint directory's ``config.json``."""
    return ModelConfig.from_hf_config(read_hf_config(path), head=head, **overrides)


def from_pretrained(
    path: str | os.PathLike[str],
    cfg: ModelConfig | None = None,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
    frozen: bool = False,
) -> GkdModel:
    """Build a model from a local HF checkpoint directory.

    Args:
        path: Directory with ``config.json`` and ``model.safetensors`` (or a sharded index),
            or ``pkg:module/sub`` inside an installed package. Hub ids are not downloaded.
        cfg: Architecture; default :func:`load_model_config` of ``path``.
        strict: Passed to :func:`load_hf_weights`. Non-strict loading leaves missing
            parameters at their random initialisation (drawn with ``seed``).
        device: Target device.
        seed: Seed of the initialisation of parameters the checkpoint does not provide.
        frozen: A teacher: eval mode and ``requires_grad=False`` on every parameter
            (``.eval()`` alone leaves parameters trainable, as in torch).

    Raises:
        MissingCheckpointError: See :func:`checkpoint_dir`; also when the weights file is missing.
    """
    directory = checkpoint_dir(path)
    cfg = cfg if cfg is not None else load_model_config(directory)
    model = build_model(cfg, seed=seed, init_weights=not strict, device="cpu")
    load_hf_weights(model, directory, strict=strict)
    if frozen:
        model.requires_grad_(False).eval()
    if device is not None:
        model = model.to(device)
    elif torch.cuda.is_available():
        model = model.cuda()
    return model


# --------------------------------------------------------------------------- export
def hf_state_dict(model: GkdModel) -> dict[str, torch.Tensor]:
    """Full (TP-merged, unpadded) HF-named CPU tensors of ``model``.

    Collective under tensor parallelism: every rank of the TP group must call it.
    """
    cfg = model.model_config
    tp = model.config.tensor_model_parallel_size
    group = parallel.tp_group()
    entries = _entries(cfg, hf_prefix(cfg))
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        kind = shard_kind(name, cfg)
        full = gather_full(param, kind, group, tp)
        if kind is ShardKind.VOCAB:
            full = full[: cfg.vocab_size]
        for hf_name, tensor in zip(entries[name].hf, entries[name].split(full), strict=True):
            out[hf_name] = tensor.detach().to("cpu").contiguous().clone()
    if "cls.predictions.bias" in out:
        # transformers ties decoder.bias to this tensor; 4.x checkpoints carry both keys.
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    elif "cls.predictions.decoder.bias" in out:  # untied MobileBERT: the same values in both
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"].clone()
    return out


def export_hf(
    model: GkdModel,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory.

    Files: ``model.safetensors``, ``config.json`` and the tokenizer files found in
    ``tokenizer_dir`` (see :data:`TOKENIZER_FILES`). Under TP the shards are gathered
    (collective) and global rank 0 writes; all ranks return after the files exist.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    tensors = hf_state_dict(model)
    if model.model_config.head == "mlm":
        # The MLM classes of transformers (and gkd's reader of an MLM checkpoint) have no pooler:
        # an MLM model's pooler feeds nothing, and writing it would make the export unloadable.
        tensors = {k: v for k, v in tensors.items() if ".pooler." not in f".{k}"}
    if parallel.is_global_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
        )
        config_text = json.dumps(model.model_config.to_hf_config(), indent=2, sort_keys=True) + "\n"
        atomic_write(out / "config.json", lambda p: p.write_text(config_text))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    atomic_write(out / name, lambda p, src=src: shutil.copyfile(src, p))
    parallel.barrier()
    return out


__all__ = [
    "HEAD_PARAMETER_PREFIXES",
    "TOKENIZER_FILES",
    "WEIGHT_FILES",
    "DictSource",
    "LoadReport",
    "MissingCheckpointError",
    "SafetensorsDir",
    "TensorSource",
    "checkpoint_dir",
    "detect_hf_prefix",
    "export_hf",
    "from_pretrained",
    "hf_prefix",
    "hf_state_dict",
    "load_hf_weights",
    "load_model_config",
    "read_hf_config",
]
