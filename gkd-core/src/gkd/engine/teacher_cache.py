"""The teacher-output cache: a frozen teacher's outputs for an example, computed once and served
from disk in later epochs, stages and runs.

When a request may be served: the merged request of one pass for a teacher puts no operation on
it, asks for no gradient, and the teacher is frozen (eval mode, no trainable parameter) and not
partitioned over ranks. Then its outputs are a pure function of (weights, token ids, requested
features), so each method's plan — not a list of method names — decides. A request that fails
one of these conditions runs the teacher as without a cache (``cache: auto``) or stops the run
(``cache: required``) with the reason.

Entries are per example and feature, keyed by the sha256 of the example's token ids (its own
tokens, without padding) inside a *namespace* that covers the teacher's weights (sha256 of its
checkpoint), dtype, tensor-parallel rank and size, the tokenizer files, ``task.max_length``
and the cache's precision. A batch is served when every example holds every requested
feature; otherwise the teacher runs on the whole batch and the missing entries are written.

Features are stored for the example's own tokens; the padding positions of a served batch are
filled (zeros; attention scores: the masked value at padded key columns). Every built-in method
masks padding, and gkd's models give an example's tokens the same values whatever the batch and
its padding, so an ``exact`` cache reproduces an uncached run bit for bit on CPU.

``compressed``: floating features in fp16 (or bf16); logits with more than ``top_k`` entries per
position as the top ``k`` values and indices plus one filler logit that holds the remaining
probability mass (every other entry gets it, so ``softmax`` at temperature 1 keeps the top-k
probabilities and the rest's total exactly).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.config.run import CacheConfig
from gkd.engine.cache_store import NAMESPACE_FILE, ShardStore
from gkd.engine.fingerprint import file_sha256, sha256_of_checkpoint
from gkd.errors import GkdError
from gkd.models.taps import VOCAB_SHARD
from gkd.parallel.comm import any_rank

LOGITS = "output.logits"
"""Entry name of the model's logits (``ModelView.logits``); the tap ``logits`` is served from it."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "merges.txt", "vocab.json")
COMPRESSED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_TOPK_VALUES, _TOPK_INDICES, _TOPK_REST = "@topk.values", "@topk.indices", "@topk.rest"


class CacheRequiredError(GkdError):
    """``cache: required`` and a stage's teacher request cannot be served from the cache."""


def seq_dims(name: str, ndim: int) -> tuple[int, ...]:
    """Dimensions of feature ``name`` that run over the sequence (batch first, see :mod:`gkd.models.taps`)."""
    role = name.split(".", 2)[2] if name.startswith("layers.") else name
    if role in ("attention.scores", "attention.probs"):
        return (2, 3)
    if role in ("attention.query", "attention.key", "attention.value"):
        return (2,)
    if role == "pooled" or ndim < 3:  # pooled, classification logits
        return ()
    return (1,)


def _trim(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    for d in seq_dims(name, t.dim() + 1):  # t is one row: its dims are the batch dims shifted by one
        t = t.narrow(d - 1, 0, n)
    return t


def _pad_row(t: torch.Tensor, name: str, length: int) -> torch.Tensor:
    """One example's stored tensor padded back to ``length`` positions."""
    dims = seq_dims(name, t.dim() + 1)
    if not dims or t.shape[dims[0] - 1] == length:
        return t
    n = t.shape[dims[0] - 1]
    shape = list(t.shape)
    for d in dims:
        shape[d - 1] = length
    out = t.new_zeros(shape)
    if name.endswith("attention.scores"):  # padded key columns hold the masked value, as the model writes them
        out[..., n:] = torch.finfo(t.dtype).min
    out[tuple(slice(0, n) if d + 1 in dims else slice(None) for d in range(t.dim()))] = t
    return out


def _right_padded_lengths(mask: torch.Tensor) -> list[int] | None:
    """Each row's token count when every row is tokens then padding; None otherwise."""
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    if not torch.equal(mask.bool(), positions < lengths.unsqueeze(1)):
        return None
    return [int(n) for n in lengths]


def _compress_logits(row: torch.Tensor, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Top-k of the last dimension plus the filler logit of the remaining mass."""
    vocab = row.shape[-1]
    z = row.double()
    values, indices = z.topk(k, dim=-1)
    lse_all = torch.logsumexp(z, dim=-1)
    lse_top = torch.logsumexp(values, dim=-1)
    rest = lse_all + torch.log1p(-torch.exp(lse_top - lse_all).clamp(max=1.0)) - math.log(vocab - k)
    rest = torch.where(torch.isfinite(rest), rest, values[..., -1] - 80.0)  # no mass left: far below the top-k
    index_dtype = torch.int16 if vocab <= 2**15 else torch.int32
    return {_TOPK_VALUES: values.to(dtype), _TOPK_INDICES: indices.to(index_dtype), _TOPK_REST: rest.to(dtype)}


def _expand_logits(parts: Mapping[str, torch.Tensor], vocab: int, dtype: torch.dtype) -> torch.Tensor:
    rest = parts[_TOPK_REST].to(dtype)
    out = rest.unsqueeze(-1).expand(*rest.shape, vocab).clone()
    return out.scatter_(-1, parts[_TOPK_INDICES].long(), parts[_TOPK_VALUES].to(dtype))


@dataclass
class CacheStats:
    rows_served: int = 0
    rows_computed: int = 0
    batches_served: int = 0
    batches_computed: int = 0
    bytes_written: int = 0
    tokens_written: int = 0
    bytes_by_feature: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        total = self.rows_served + self.rows_computed
        share = f"{100 * self.rows_served / total:.0f}%" if total else "0%"
        per_token = f", {self.bytes_written / self.tokens_written:.0f} B/token" if self.tokens_written else ""
        return (f"teacher cache: {self.batches_served} of {self.batches_served + self.batches_computed} teacher "
                f"batches served ({share} of examples); wrote {self.bytes_written / 2**20:.1f} MiB{per_token}")


@dataclass
class TeacherEntry:
    """The cache of one teacher of a stage."""

    model: nn.Module
    store: ShardStore
    vocab: int | None
    """Entries per logits position (the vocabulary, or the classes of a classification head)."""
    dtype: torch.dtype
    has_logits: bool = True
    frozen: bool = True
    """In eval mode without a trainable parameter (checked once: a stage does not change it)."""

    @classmethod
    def of(cls, model: nn.Module, store: ShardStore) -> TeacherEntry:
        cfg = getattr(model, "model_config", None)
        head = getattr(cfg, "head", None)
        width = getattr(cfg, "num_labels", None) if head == "classification" else getattr(cfg, "vocab_size", None)
        param = next(iter(model.parameters()), None)
        frozen = not model.training and not any(p.requires_grad for p in model.parameters())
        return cls(model, store, width, param.dtype if param is not None else torch.float32, has_logits=head != "none",
                   frozen=frozen)


class TeacherCache:
    """Serves and fills the teacher requests of one stage (built by :meth:`for_stage`)."""

    def __init__(self, settings: CacheConfig, teachers: Mapping[str, TeacherEntry], *, stage: str,
                 partitioned: frozenset[str] = frozenset(), echo: Callable[[str], None] = lambda _: None) -> None:
        self.settings = settings
        self.teachers = dict(teachers)
        self.stage = stage
        self.partitioned = partitioned
        self.echo = echo
        self.stats = CacheStats()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._pending_bytes: dict[str, int] = {}
        for entry in self.teachers.values():
            for line in entry.store.dropped:
                echo(line)
            entry.store.dropped.clear()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def namespace(*, teacher_sha256: str, dtype: str, tp_rank: int, tp_size: int, settings: CacheConfig,
                  tokenizer_sha256: str, max_length: int, config: Mapping[str, Any]) -> dict[str, Any]:
        """What the entries of one directory depend on besides the token ids."""
        described: dict[str, Any] = {"teacher_sha256": teacher_sha256, "dtype": dtype, "tp_rank": tp_rank,
                                     "tp_size": tp_size, "precision": settings.precision,
                                     "tokenizer_sha256": tokenizer_sha256, "max_length": max_length,
                                     "model": dict(config)}
        if settings.precision == "compressed":
            described |= {"top_k": settings.top_k, "compressed_dtype": settings.dtype}
        return described

    @classmethod
    def for_stage(cls, settings: CacheConfig, root: Path, *, stage: str, teachers: Mapping[str, tuple[nn.Module, Path, str]],
                  tokenizer_dir: Path, max_length: int, tp_rank: int = 0, tp_size: int = 1,
                  partitioned: frozenset[str] = frozenset(), echo: Callable[[str], None] = lambda _: None) -> TeacherCache:
        """``teachers``: model key → (model, checkpoint directory, dtype name)."""
        tokenizer = hashlib.sha256("".join(
            f"{file_sha256(tokenizer_dir / n)}  {n}\n" for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()
        ).encode()).hexdigest()
        entries = {}
        for key, (model, path, dtype) in teachers.items():
            cfg = getattr(model, "model_config", None)
            described = cls.namespace(teacher_sha256=sha256_of_checkpoint(path), dtype=dtype, tp_rank=tp_rank,
                                      tp_size=tp_size, settings=settings, tokenizer_sha256=tokenizer,
                                      max_length=max_length,
                                      config={"family": getattr(cfg, "family", None), "head": getattr(cfg, "head", None)})
            digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
            directory = root / digest
            directory.mkdir(parents=True, exist_ok=True)
            marker = directory / NAMESPACE_FILE
            if not marker.exists():
                tmp = directory / f".{NAMESPACE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                tmp.write_text(json.dumps(described | {"teacher_path": str(path)}, indent=1, sort_keys=True))
                tmp.replace(marker)
            entries[key] = TeacherEntry.of(model, ShardStore(directory))
        return cls(settings, entries, stage=stage, partitioned=partitioned, echo=echo)

    @classmethod
    def for_models(cls, settings: CacheConfig, root: Path, models: Mapping[str, nn.Module], *, stage: str = "research",
                   echo: Callable[[str], None] = lambda _: None) -> TeacherCache:
        """A cache of in-memory teachers (``{"teacher:NAME": model}``, research code, tests): each
        namespace is keyed by the sha256 of the model's parameters and buffers, not of a file."""
        entries = {}
        for key, model in models.items():
            if not key.startswith("teacher:"):
                continue
            digest = hashlib.sha256(json.dumps(cls.namespace(
                teacher_sha256="", dtype="", tp_rank=0, tp_size=1, settings=settings, tokenizer_sha256="",
                max_length=0, config={}), sort_keys=True).encode())
            for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()]):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            entries[key] = TeacherEntry.of(model, ShardStore(root / digest.hexdigest()[:32]))
        return cls(settings, entries, stage=stage, echo=echo)

    # ------------------------------------------------------------------ the decision

    def why_not(self, key: str, request: Any, teacher_grad: bool = False) -> str | None:
        """Why ``request`` (a merged :class:`~gkd.engine.plan.ModelRequest`) for model ``key``
        cannot be served from the cache; None when it can."""
        entry = self.teachers.get(key)
        name = key.split(":", 1)[-1]
        if entry is None:
            return f"'{key}' is not a frozen teacher of this stage"
        if request.operations:
            methods = sorted({m for ops in request.operations.values() for m, _ in ops})
            points = ", ".join(sorted(request.operations))
            return (f"method(s) {', '.join(methods)} put an operation on teacher '{name}' ({points}), so its "
                    "outputs depend on more than its input")
        if request.grad or teacher_grad:
            return f"a method backpropagates through teacher '{name}'"
        if key in self.partitioned:
            return f"teacher '{name}' is partitioned over data-parallel ranks (teachers[].partition)"
        if not entry.frozen:
            return f"teacher '{name}' is not frozen in eval mode"
        return None

    def may_serve(self, key: str, request: Any, teacher_grad: bool = False) -> bool:
        """Whether this request may be served from (and kept in) the cache.

        Raises:
            CacheRequiredError: ``cache: required`` and it may not (the reason, in one line).
        """
        reason = self.why_not(key, request, teacher_grad)
        if reason is not None and self.settings.mode == "required":
            raise CacheRequiredError(f"stage '{self.stage}': cache: required, but {reason}; "
                                     "use cache: auto to run such teachers uncached")
        return reason is None

    def check_used(self) -> None:
        """After a stage's first step (not on resuming it): under ``required``, stop when no teacher
        request reached the cache (the stage's methods run teachers some other way, e.g. Theseus runs teacher layers
        inside the student's forward).

        Raises:
            CacheRequiredError: ``cache: required`` and nothing was served or computed through the cache.
        """
        if self.settings.mode == "required" and self.teachers and \
                not (self.stats.batches_served or self.stats.batches_computed):
            raise CacheRequiredError(
                f"stage '{self.stage}': cache: required, but its methods ran no forward pass of "
                f"{', '.join(k.split(':', 1)[1] for k in self.teachers)} that the cache could serve (e.g. a method "
                "that runs teacher layers inside the student's forward); use cache: auto")

    # ------------------------------------------------------------------ serve and fill

    def _row_keys(self, batch: Mapping[str, torch.Tensor], lengths: list[int]) -> list[str]:
        keys = []
        for i, n in enumerate(lengths):
            digest = hashlib.sha256()
            for name in ("input_ids", "token_type_ids"):
                if name in batch:
                    digest.update(name.encode())
                    digest.update(batch[name][i, :n].to(torch.int64).cpu().numpy().tobytes())
            keys.append(digest.hexdigest())
        return keys

    def _stored_names(self, entry: TeacherEntry, feature: str) -> set[str]:
        if feature == LOGITS and self._compressed_logits(entry):
            return {LOGITS + _TOPK_VALUES, LOGITS + _TOPK_INDICES, LOGITS + _TOPK_REST}
        return {feature}

    def _compressed_logits(self, entry: TeacherEntry) -> bool:
        return self.settings.precision == "compressed" and entry.vocab is not None and entry.vocab > self.settings.top_k

    @staticmethod
    def _wanted(features: set[str], wants_logits: bool) -> set[str]:
        wanted = {f for f in features if f != "logits"}
        if wants_logits or "logits" in features:
            wanted.add(LOGITS)
        return wanted

    def lookup(self, key: str, features: set[str],
               batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
        """The features (``features``: what the model would capture) and logits of ``batch`` from
        the cache, or None (then run the teacher and call :meth:`store`). Collective in a
        multi-process job: every rank serves, or none does."""
        entry = self.teachers[key]
        # As the model does: no logits without a head, nor when only the vocabulary shard is recorded.
        wants_logits = entry.has_logits and not (VOCAB_SHARD in features and "logits" not in features)
        lengths = _right_padded_lengths(batch["attention_mask"])
        wanted = self._wanted(features, wants_logits)
        names = set().union(*(self._stored_names(entry, f) for f in wanted)) if wanted else set()
        keys = self._row_keys(batch, lengths) if lengths is not None else []
        pending = self._pending.get(key, {})
        hit = lengths is not None and all(self._holds(entry, pending, k, names) for k in keys)
        if lengths is not None and not hit:  # other ranks and runs may have written them since
            entry.store.refresh()
            hit = all(self._holds(entry, pending, k, names) for k in keys)
        hit = hit and entry.store.verify(keys, names)  # a damaged shard is dropped: a miss, recomputed
        for line in entry.store.dropped:
            self.echo(line)
        entry.store.dropped.clear()
        if any_rank(not hit):  # every rank must run the teacher, or none (its forward may be collective)
            return None
        assert lengths is not None
        length = batch["attention_mask"].shape[1]
        rows: dict[str, list[torch.Tensor]] = {}
        for k in keys:
            for feature in wanted:
                rows.setdefault(feature, []).append(_pad_row(self._read(entry, pending, k, feature), feature, length))
        device = batch["attention_mask"].device
        out = {f: torch.stack(r).to(device) for f, r in rows.items()}
        self.stats.rows_served += len(keys)
        self.stats.batches_served += 1
        logits = out.pop(LOGITS, None)
        if "logits" in features:
            out["logits"] = logits  # type: ignore[assignment]
        return out, logits if wants_logits else None

    @staticmethod
    def _holds(entry: TeacherEntry, pending: Mapping[str, torch.Tensor], key: str, names: set[str]) -> bool:
        """Whether every entry ``key/name`` exists (written, or computed this stage and not yet written)."""
        return entry.store.has(key, {n for n in names if f"{key}/{n}" not in pending})

    @staticmethod
    def _get(entry: TeacherEntry, pending: Mapping[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
        held = pending.get(f"{key}/{name}")
        return held if held is not None else entry.store.get(key, name)

    def _read(self, entry: TeacherEntry, pending: Mapping[str, torch.Tensor], key: str, feature: str) -> torch.Tensor:
        if feature == LOGITS and self._compressed_logits(entry):
            parts = {p: self._get(entry, pending, key, LOGITS + p) for p in (_TOPK_VALUES, _TOPK_INDICES, _TOPK_REST)}
            assert entry.vocab is not None
            return _expand_logits(parts, entry.vocab, entry.dtype)
        t = self._get(entry, pending, key, feature)
        return t.to(entry.dtype) if t.is_floating_point() and t.dtype != entry.dtype else t

    def store(self, key: str, features: Mapping[str, torch.Tensor], logits: torch.Tensor | None,
              batch: Mapping[str, torch.Tensor]) -> None:
        """Keep a computed batch's entries that are missing (written in shards of about 64 MiB)."""
        entry = self.teachers[key]
        lengths = _right_padded_lengths(batch["attention_mask"])
        self.stats.rows_computed += batch["attention_mask"].shape[0]
        self.stats.batches_computed += 1
        if lengths is None:
            return
        keys = self._row_keys(batch, lengths)
        named = {f: t for f, t in features.items() if f != "logits"}
        if logits is not None:
            named[LOGITS] = logits
        pending = self._pending.setdefault(key, {})
        compress = COMPRESSED_DTYPES[self.settings.dtype] if self.settings.precision == "compressed" else None
        for i, (row_key, n) in enumerate(zip(keys, lengths, strict=True)):
            for feature, tensor in named.items():
                if self._holds(entry, pending, row_key, self._stored_names(entry, feature)):
                    continue
                row = _trim(tensor[i].detach(), feature, n).cpu()
                if feature == LOGITS and self._compressed_logits(entry):
                    assert compress is not None
                    parts = {feature + p: v for p, v in
                             _compress_logits(row, self.settings.top_k, compress).items()}
                elif compress is not None and row.is_floating_point() and feature != LOGITS:  # few classes: exact
                    parts = {feature: row.to(compress)}
                else:
                    parts = {feature: row.clone()}
                for name, value in parts.items():
                    pending[f"{row_key}/{name}"] = value
                    size = value.numel() * value.element_size()
                    self._pending_bytes[key] = self._pending_bytes.get(key, 0) + size
                    self.stats.bytes_written += size
                    self.stats.bytes_by_feature[_kind(name)] = self.stats.bytes_by_feature.get(_kind(name), 0) + size
            self.stats.tokens_written += n
        if self._pending_bytes.get(key, 0) >= 64 * 2**20:
            self._flush(key)

    def _flush(self, key: str) -> None:
        pending = self._pending.pop(key, {})
        self._pending_bytes.pop(key, None)
        self.teachers[key].store.put(pending)

    def flush(self) -> None:
        """Write every pending entry (at checkpoints, stops and the stage's end)."""
        for key in list(self._pending):
            self._flush(key)


def _kind(feature: str) -> str:
    """``hidden states`` / ``attention.scores`` / ``logits``…: the kind of a stored feature, for byte counts."""
    if feature.startswith(LOGITS):
        return "logits"
    if feature.startswith("layers."):
        role = feature.split(".", 2)[2]
        return "hidden states" if role in ("input", "output") else role
    return "hidden states" if feature in ("embeddings", "final_norm") else feature
