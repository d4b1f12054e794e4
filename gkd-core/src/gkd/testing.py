"""Helpers for testing methods (shipped so third-party plugin authors can use them too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gkd.config.schema import apply_defaults
from gkd.methods.api import (
    STUDENT,
    Method,
    MethodContext,
    ModelShape,
    ModelView,
    PassView,
    StepContext,
    teacher_key,
)
from gkd.plugins.manager import load_plugin_manager


def shape(family: str = "encoder", num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
          vocab_size: int = 100, num_labels: int | None = 3) -> ModelShape:
    return ModelShape(family, num_layers, hidden_size, num_heads, num_heads, 4 * hidden_size, vocab_size, num_labels)


def build_method(name: str, config: Mapping[str, Any] | None = None, *, student: ModelShape | None = None,
                 teachers: Mapping[str, ModelShape] | None = None, task: str = "sequence_classification") -> Method:
    """Build a registered method exactly as the engine does: schema defaults, then its factory."""
    spec = load_plugin_manager().registry.get(name).spec
    cfg = apply_defaults(spec.config_schema, dict(config or {}))
    ctx = MethodContext(student=student or shape(num_layers=2),
                        teachers=teachers or {"t": shape()}, task=task, stage_kind="task")
    assert spec.factory is not None
    return spec.factory(cfg, ctx)


def step(iteration: int = 0, total: int = 10, seed: int = 0) -> StepContext:
    return StepContext("test", 0, 0, iteration, total, torch.Generator().manual_seed(seed))


def outputs(batch: Mapping[str, torch.Tensor], student: ModelView, teachers: Mapping[str, ModelView]) -> PassView:
    models = {STUDENT: student} | {teacher_key(k): v for k, v in teachers.items()}
    return PassView(batch=dict(batch), models=models)
