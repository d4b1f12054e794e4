"""From a validated run config to runtime objects that need no model weights: model shapes
and the selected methods of a stage (with their auxiliary parameters and initial state)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gkd.config.run import RunConfig, StageConfig, StudentInit
from gkd.engine.method import MethodContext, ModelShape
from gkd.engine.step import SelectedMethod
from gkd.plugins.errors import GkdError
from gkd.plugins.registry import MethodRegistry

_DECODER_TYPES = {"llama", "mistral", "qwen2"}


def shape_from_checkpoint(path: Path, num_labels: int | None = None) -> ModelShape:
    """Read a Hugging Face ``config.json`` into a :class:`ModelShape`."""
    cfg: dict[str, Any] = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    labels = num_labels if num_labels is not None else (len(cfg["id2label"]) if "id2label" in cfg else None)
    return ModelShape(
        family="decoder" if cfg.get("model_type") in _DECODER_TYPES else "encoder",
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        num_labels=labels,
    )


def student_shape(init: StudentInit, architecture: Mapping[str, int], teacher_paths: Mapping[str, Path],
                  num_labels: int | None) -> ModelShape:
    """The student's shape before it is built, from its init strategy and overrides."""
    if init.strategy in ("truncate", "random") and init.teacher is not None:
        base = shape_from_checkpoint(teacher_paths[init.teacher], num_labels)
    elif init.strategy == "run":
        assert init.path is not None
        base = shape_from_checkpoint(init.path / "export", num_labels)
    else:
        assert init.path is not None
        base = shape_from_checkpoint(init.path, num_labels)
    layers = len(init.layers) if isinstance(init.layers, tuple) else (init.num_layers or base.num_layers)
    if init.strategy in ("truncate", "random"):
        base = ModelShape(base.family, layers, base.hidden_size, base.num_heads, base.num_kv_heads,
                          base.ffn_hidden_size, base.vocab_size, base.num_labels)
    arch = dict(architecture)
    heads = arch.get("num_heads", base.num_heads)
    return ModelShape(
        family=base.family,
        num_layers=arch.get("num_layers", base.num_layers),
        hidden_size=arch.get("hidden_size", base.hidden_size),
        num_heads=heads,
        num_kv_heads=arch.get("num_kv_heads", heads if "num_heads" in arch else base.num_kv_heads),
        ffn_hidden_size=arch.get("ffn_hidden_size", base.ffn_hidden_size),
        vocab_size=base.vocab_size,
        num_labels=base.num_labels,
    )


def build_methods(run: RunConfig, stage: StageConfig, registry: MethodRegistry, student: ModelShape,
                  teachers: Mapping[str, ModelShape]) -> dict[str, SelectedMethod]:
    """Instantiate the stage's methods in config order, each with its own initial state."""
    selected: dict[str, SelectedMethod] = {}
    for index, entry in enumerate(stage.methods):
        spec = registry.get(entry.name).spec
        if spec.factory is None:
            raise GkdError(f"stages[{run.stages.index(stage)}].methods[{index}]: method '{entry.name}' has no implementation")
        if entry.name in selected:
            raise GkdError(f"stage '{stage.name}' selects method '{entry.name}' twice")
        context = MethodContext(student=student, teachers={t: teachers[t] for t in entry.teachers},
                                task=run.task["type"], stage_kind=stage.kind, tensor_parallel=run.parallel.tensor_parallel)
        method = spec.factory(entry.config, context)
        selected[entry.name] = SelectedMethod(method, entry.weight, method.initial_state())
    return selected
