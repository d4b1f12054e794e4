"""Teacher and student models on megatron-core.

Public surface::

    from gkd.models import ModelConfig, build_model
    model = build_model(ModelConfig(family="encoder", ...))      # or from_pretrained(dir)
    out = model(input_ids, attention_mask)                         # ModelOutput
    with model.capture(features={"layers.1.output"}, operations={"embeddings": fn}) as feats:
        out = model(input_ids, attention_mask)
    export_hf(model, out_dir, tokenizer_dir=...)
    tok = Tokenizer.from_dir(checkpoint_dir, max_length=128); batch = tok.encode(texts)

See ``docs/models.md`` for tap names, layouts, TP sharding and operation hooks.
"""

from gkd.models.checkpoint import (
    DictSource,
    LoadReport,
    SafetensorsDir,
    export_hf,
    from_pretrained,
    hf_state_dict,
    load_hf_weights,
    load_model_config,
    read_hf_config,
)
from gkd.models.config import FAMILIES, HEADS_BY_FAMILY, ModelConfig
from gkd.models.init import (
    StudentInit,
    distilled_student,
    init_student,
    pretrained_student,
    random_student,
    select_teacher_layers,
    truncated_student,
)
from gkd.models.model import GkdModel, ModelOutput, build_model, count_parameters
from gkd.models.operations import (
    add_perturbation,
    compose,
    replace_with,
    swap_layers,
    write_positions,
    write_span,
)
from gkd.models.sharding import ShardKind, shard_kind
from gkd.models.taps import LAYER_ROLES, LAYERS_OPERATION, SHARDED_ROLES, CaptureSession, Layout
from gkd.models.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "FAMILIES",
    "HEADS_BY_FAMILY",
    "LAYERS_OPERATION",
    "LAYER_ROLES",
    "SHARDED_ROLES",
    "CaptureSession",
    "DictSource",
    "GkdModel",
    "Layout",
    "LoadReport",
    "ModelConfig",
    "ModelOutput",
    "SafetensorsDir",
    "ShardKind",
    "StudentInit",
    "Tokenizer",
    "TokenizerError",
    "add_perturbation",
    "build_model",
    "compose",
    "count_parameters",
    "distilled_student",
    "export_hf",
    "from_pretrained",
    "hf_state_dict",
    "init_student",
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
