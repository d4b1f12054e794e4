"""Named feature taps and operation hooks.

A *tap* is a named point in the forward pass where a value can be recorded (a *feature*)
or replaced (an *operation*). Names are stable across families and TP sizes:

=================================  ======================================  =============
name                               layout (batch first)                    TP
=================================  ======================================  =============
``embeddings``                     ``[b, s, h]`` input of layer 0          replicated
``layers.{i}.input``               ``[b, s, h]``                           replicated
``layers.{i}.output``              ``[b, s, h]`` (post-LN for encoders)    replicated
``layers.{i}.attention.query``     ``[b, heads_local, s, d]``              sharded (heads)
``layers.{i}.attention.key``       ``[b, kv_heads_local, s, d]``           sharded (heads)
``layers.{i}.attention.value``     ``[b, kv_heads_local, s, d]``           sharded (heads)
``layers.{i}.attention.scores``    ``[b, heads_local, s, s]``              sharded (heads)
``layers.{i}.attention.probs``     ``[b, heads_local, s, s]``              sharded (heads)
``layers.{i}.attention.context``   ``[b, s, heads_local*d]``               sharded (last)
``layers.{i}.ffn.intermediate``    ``[b, s, ffn_local]``                   sharded (last)
``final_norm``                     ``[b, s, h]`` (decoders)                replicated
``logits``                         ``[b, s, V]`` or ``[b, num_labels]``    gathered
``logits.vocab_shard``             ``[b, s, V_pad/tp]`` (LM / MLM heads)   sharded (vocab)
``pooled``                         ``[b, h]`` (encoders with a pooler)     replicated
=================================  ======================================  =============

plus the operation-only point ``layers`` (the list of layer modules to run).

``logits.vocab_shard`` (:data:`VOCAB_SHARD`) is this rank's slice of the vocabulary-parallel
output layer before the all-gather: rank ``r`` holds entries ``[r·w, (r+1)·w)`` of the vocabulary
padded to a multiple of ``tp`` (``w = V_pad / tp``); entries from ``vocab_size`` on are padding.
A pass that records or operates on it but not on ``logits`` skips the all-gather: the model's
``ForwardOutput.logits`` is then ``None`` and the full ``[b, s, V]`` tensor never exists
(:func:`gkd.methods.losses.vocab_parallel_soft_loss` and friends compute losses from shards).

The machinery: :meth:`GkdModel.capture` creates a :class:`CaptureSession`; the model's
forward makes it the *active* session (a context variable) for exactly one pass; modules
call :func:`tap` / :func:`tap_in_layer` at their tap points. Without an active session,
or for a name nobody asked for, :func:`tap` returns its input untouched and keeps nothing.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

LAYER_ROLES: tuple[str, ...] = (
    "input",
    "output",
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.scores",
    "attention.probs",
    "attention.context",
    "ffn.intermediate",
)
"""Per-layer tap roles; the full name is ``layers.{i}.{role}``."""

SHARDED_ROLES: frozenset[str] = frozenset(r for r in LAYER_ROLES if r.startswith(("attention.", "ffn.")))
"""Roles whose tensors are split over tensor-parallel ranks (heads or last dimension)."""

LAYERS_OPERATION = "layers"
"""Operation-only point: ``fn(list[nn.Module]) -> list[nn.Module]`` picks the layers to run."""

VOCAB_SHARD = "logits.vocab_shard"
"""Tap of this rank's vocabulary shard of LM / MLM logits (asked for alone, no all-gather runs)."""

Operation = Callable[[Any], Any]
"""An operation hook: called with the value at its tap point, returns the replacement
(for the point ``layers``: receives and returns the list of layer modules to run)."""


class Layout(enum.Enum):
    """Internal (megatron) layout of a tapped tensor; taps expose it batch first."""

    SBH = "sbh"
    """``[s, b, ...]`` → ``[b, s, ...]`` (hidden states, context, ffn intermediate)."""
    SBND = "sbnd"
    """``[s, b, n, d]`` → ``[b, n, s, d]`` (query, key, value)."""
    PUBLIC = "public"
    """Already batch first (scores, probs, logits, pooled)."""


def _to_public(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout is Layout.SBH:
        return t.transpose(0, 1)
    if layout is Layout.SBND:
        return t.permute(1, 2, 0, 3)
    return t


def _from_public(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout is Layout.SBH:
        return t.transpose(0, 1)
    if layout is Layout.SBND:
        return t.permute(2, 0, 1, 3)
    return t


class CaptureSession:
    """Requests and operations for one forward pass, and the features it recorded.

    Args:
        features: Tap names to record.
        operations: Tap name → callable. For tensor taps ``fn(tensor) -> tensor`` (batch-first
            layout, same shape); for ``layers`` ``fn(list_of_modules) -> list_of_modules``.
    """

    def __init__(self, features: Iterable[str], operations: Mapping[str, Operation]) -> None:
        self.features: frozenset[str] = frozenset(features)
        self.operations: dict[str, Operation] = dict(operations)
        self.values: dict[str, torch.Tensor] = {}
        self.layer_index: int | None = None
        self._active = self.features | set(self.operations)

    def wants(self, name: str) -> bool:
        """Whether ``name`` is recorded or operated on in this pass."""
        return name in self._active

    def wants_in_layer(self, role: str) -> bool:
        """:meth:`wants` for a role of the layer currently running."""
        return self.layer_index is not None and f"layers.{self.layer_index}.{role}" in self._active

    def apply(self, name: str, value: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Run the operation at ``name`` (if any), record the result (if requested)."""
        if name not in self._active:
            return value
        op = self.operations.get(name)
        if op is not None:
            public = _to_public(value, layout)
            new = op(public)
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"operation at {name!r} returned {type(new).__name__}, expected a Tensor")
            if new.shape != public.shape:
                raise ValueError(
                    f"operation at {name!r} returned shape {tuple(new.shape)}, expected {tuple(public.shape)}"
                )
            value = _from_public(new, layout) if new is not public else value
        if name in self.features:
            # Recorded after the operation: the feature is what the rest of the pass sees. The
            # pass continues from a view *of the recorded tensor*, so a method can differentiate
            # with respect to a feature (LRC-BERT's gradient w.r.t. the embeddings).
            public = _to_public(value, layout)
            self.values[name] = public
            value = _from_public(public, layout) if public is not value else value
        return value

    def select_layers(self, layers: list[nn.Module]) -> list[nn.Module]:
        """Apply the ``layers`` operation, if any, and check its result."""
        op = self.operations.get(LAYERS_OPERATION)
        if op is None:
            return layers
        chosen = op(list(layers))
        if not isinstance(chosen, (list, tuple)) or not all(isinstance(m, nn.Module) for m in chosen):
            raise TypeError("the 'layers' operation must return a list of nn.Module")
        return list(chosen)

    @contextlib.contextmanager
    def in_layer(self, index: int) -> Iterator[None]:
        """Scope in which layer-relative roles resolve to ``layers.{index}.*``."""
        previous, self.layer_index = self.layer_index, index
        try:
            yield
        finally:
            self.layer_index = previous

    def missing(self) -> list[str]:
        """Requested features that the pass did not produce."""
        return sorted(self.features - set(self.values))


_ACTIVE: ContextVar[CaptureSession | None] = ContextVar("gkd_active_capture", default=None)


def active_session() -> CaptureSession | None:
    """The session of the forward pass running in this context, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(session: CaptureSession | None) -> Iterator[None]:
    """Make ``session`` active for the enclosed forward pass (``None`` hides outer sessions)."""
    token = _ACTIVE.set(session)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tap(name: str, value: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Tap point with a full name (``embeddings``, ``layers.3.output``, ``logits``)."""
    session = _ACTIVE.get()
    if session is None:
        return value
    return session.apply(name, value, layout)


def tap_in_layer(role: str, value: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Tap point inside a layer; resolves to ``layers.{i}.{role}`` for the running layer ``i``.

    Because the index comes from the position in the stack, a module swapped in by the
    ``layers`` operation (e.g. a teacher block) reports under the position it runs at.
    """
    session = _ACTIVE.get()
    if session is None or session.layer_index is None:
        return value
    return session.apply(f"layers.{session.layer_index}.{role}", value, layout)


def wants_in_layer(role: str) -> bool:
    """Whether the running layer's ``role`` is requested (decides eager vs fused attention)."""
    session = _ACTIVE.get()
    return session is not None and session.wants_in_layer(role)


__all__ = [
    "LAYERS_OPERATION",
    "LAYER_ROLES",
    "SHARDED_ROLES",
    "VOCAB_SHARD",
    "CaptureSession",
    "Layout",
    "Operation",
    "activate",
    "active_session",
    "tap",
    "tap_in_layer",
    "wants_in_layer",
]
