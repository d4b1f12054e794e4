"""The public API for method authors: everything a distillation method needs, in one module.

::

    from gkd.methods import (Method, MethodSpec, FeatureUse, PassPlan, ForwardRequest, STUDENT,
                             teacher_key, losses, uniform_map, hidden_tap, GkdError, hookimpl)

A method plugin imports from here only (tests also use :mod:`gkd.testing`). Groups (each name
is documented where it is defined):

* describing a method — :class:`MethodSpec`, :class:`FeatureUse`, :func:`load_schema`,
  :data:`hookimpl`, :class:`MethodRegistrar` (``gkd.methods.spec``);
* what runs every step — :class:`Method`, :class:`MethodContext`, :class:`StepContext`,
  :class:`ModelShape`, :class:`PassPlan`, :class:`ForwardRequest`, :class:`PassView`,
  :class:`ModelView`, :data:`STUDENT`, :func:`teacher_key`, :func:`teacher_logits`
  (``gkd.methods.api``);
* checks before any model exists — :meth:`Method.check` returns :class:`FeatureIssue` s;
  :func:`check_features`, :func:`logits_issues`, :func:`depth_issues`, :func:`validate_feature_patterns`,
  :func:`raise_issues` (``gkd.methods.checks``, ``gkd.methods.api``);
* operations on the forward pass — :data:`Operation`, :func:`replace_with`,
  :func:`add_perturbation`, :func:`write_positions`, :func:`write_span`, :func:`swap_layers`,
  :func:`compose`, :data:`LAYERS_OPERATION` (``gkd.models.operations``);
* loss primitives — the module :mod:`gkd.methods.losses` (mask rule and task-loss convention in
  its docstring): :func:`mse`, :func:`cosine_distance`, :func:`kl_divergence`,
  :func:`soft_cross_entropy`, :func:`kl_between_distributions`, :func:`soft_loss`,
  :func:`soft_loss_per_example`, :func:`summary_token`,
  :func:`logits_mask`, :func:`attention_valid_mask`, :func:`task_loss`,
  :func:`task_loss_per_example`, and their vocabulary-parallel forms over ``logits.vocab_shard``
  (:data:`VOCAB_SHARD`): :func:`vocab_parallel_soft_loss`, :func:`vocab_parallel_task_loss`, …;
* layer maps — :func:`uniform_map`, :func:`stride_map`, :func:`random_map`, :func:`hidden_tap`;
* tensor-parallel collectives for losses over sharded features — :func:`gather_heads`,
  :func:`gather_last_dim`, :func:`all_reduce_mean_over_tp`, … (``gkd.parallel.comm``), and
  :func:`gather_over_dp`, the batch rows of every data-parallel rank (in-batch negatives);
* :class:`GkdError` — raise it for a problem the user can fix (one line, exit code 2).

Names resolve on first use, so importing this module (as ``gkd methods list`` does for every
plugin) loads neither torch nor megatron-core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd._lazy import lazy_exports

_SPEC = ("FeatureUse", "MethodKind", "MethodSpec", "StageKind", "load_schema")
_API = ("STUDENT", "ForwardRequest", "Method", "MethodContext", "ModelShape", "ModelView", "PassPlan", "PassView",
        "StepContext", "raise_issues", "teacher_key", "teacher_logits")
_CHECKS = ("FeatureIssue", "check_features", "depth_issues", "logits_issues", "validate_feature_patterns")
_OPERATIONS = ("add_perturbation", "compose", "replace_with", "swap_layers", "write_positions", "write_span")
_LOSSES = ("SoftLoss", "attention_kl", "attention_valid_mask", "cosine_distance", "kl_between_distributions",
           "kl_divergence", "logits_mask", "masked_log_softmax", "mean_pool", "mse", "relation_log_softmax",
           "soft_cross_entropy", "soft_loss", "soft_loss_per_example", "summary_token", "task_loss",
           "task_loss_per_example", "vocab_parallel_kl_divergence", "vocab_parallel_soft_cross_entropy",
           "vocab_parallel_soft_loss", "vocab_parallel_task_loss", "vocab_parallel_task_loss_per_example")
_LAYERS = ("hidden_tap", "random_map", "stride_map", "uniform_map")
_COMM = ("all_reduce_mean_over_tp", "all_reduce_sum_over_tp", "gather_along_dim", "gather_heads", "gather_last_dim",
         "gather_over_dp", "shard_along_dim", "vocab_parallel_cross_entropy", "vocab_parallel_soft_per_position")
_STATE = ("tp_rank", "tp_world_size")

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(_SPEC, "gkd.methods.spec"),
    **dict.fromkeys(_API, "gkd.methods.api"),
    **dict.fromkeys(_CHECKS, "gkd.methods.checks"),
    **dict.fromkeys(_OPERATIONS, "gkd.models.operations"),
    "Operation": "gkd.models.taps",
    "LAYERS_OPERATION": "gkd.models.taps",
    "VOCAB_SHARD": "gkd.models.taps",
    **dict.fromkeys(_LOSSES, "gkd.methods.losses"),
    **dict.fromkeys(_LAYERS, "gkd.methods.layers"),
    **dict.fromkeys(_COMM, "gkd.parallel.comm"),
    **dict.fromkeys(_STATE, "gkd.parallel.state"),
    "GkdError": "gkd.errors",
    "hard_loss_claim": "gkd.methods.prediction",
    "vocab_parallel_prediction": "gkd.methods.prediction",
    "prediction_issues": "gkd.methods.prediction",
    "prediction_terms": "gkd.methods.prediction",
    "hookimpl": "gkd.hookspecs",
    "MethodRegistrar": "gkd.plugins.registry",
}

_SUBMODULES = ("checks", "layers", "losses")

_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:  # the sub-module itself, e.g. ``from gkd.methods import losses``
        import importlib

        return importlib.import_module(f"gkd.methods.{name}")
    return _getattr(name)


__all__ = [
    "LAYERS_OPERATION",
    "STUDENT",
    "VOCAB_SHARD",
    "FeatureIssue",
    "FeatureUse",
    "ForwardRequest",
    "GkdError",
    "Method",
    "MethodContext",
    "MethodKind",
    "MethodRegistrar",
    "MethodSpec",
    "ModelShape",
    "ModelView",
    "Operation",
    "PassPlan",
    "PassView",
    "SoftLoss",
    "StageKind",
    "StepContext",
    "add_perturbation",
    "all_reduce_mean_over_tp",
    "all_reduce_sum_over_tp",
    "attention_kl",
    "attention_valid_mask",
    "check_features",
    "checks",
    "compose",
    "cosine_distance",
    "depth_issues",
    "gather_along_dim",
    "gather_heads",
    "gather_last_dim",
    "gather_over_dp",
    "hard_loss_claim",
    "hidden_tap",
    "hookimpl",
    "kl_between_distributions",
    "kl_divergence",
    "layers",
    "load_schema",
    "logits_issues",
    "logits_mask",
    "losses",
    "masked_log_softmax",
    "mean_pool",
    "mse",
    "prediction_issues",
    "prediction_terms",
    "raise_issues",
    "random_map",
    "relation_log_softmax",
    "replace_with",
    "shard_along_dim",
    "soft_cross_entropy",
    "soft_loss",
    "soft_loss_per_example",
    "stride_map",
    "summary_token",
    "swap_layers",
    "task_loss",
    "task_loss_per_example",
    "teacher_key",
    "teacher_logits",
    "tp_rank",
    "tp_world_size",
    "uniform_map",
    "validate_feature_patterns",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_kl_divergence",
    "vocab_parallel_prediction",
    "vocab_parallel_soft_cross_entropy",
    "vocab_parallel_soft_loss",
    "vocab_parallel_soft_per_position",
    "vocab_parallel_task_loss",
    "vocab_parallel_task_loss_per_example",
    "write_positions",
    "write_span",
]

if TYPE_CHECKING:
    from gkd.errors import GkdError
    from gkd.hookspecs import hookimpl
    from gkd.methods import checks, layers, losses
    from gkd.methods.api import (
        STUDENT,
        ForwardRequest,
        Method,
        MethodContext,
        ModelShape,
        ModelView,
        PassPlan,
        PassView,
        StepContext,
        raise_issues,
        teacher_key,
        teacher_logits,
    )
    from gkd.methods.checks import (
        FeatureIssue,
        check_features,
        depth_issues,
        logits_issues,
        validate_feature_patterns,
    )
    from gkd.methods.layers import hidden_tap, random_map, stride_map, uniform_map
    from gkd.methods.losses import (
        SoftLoss,
        attention_kl,
        attention_valid_mask,
        cosine_distance,
        kl_between_distributions,
        kl_divergence,
        logits_mask,
        masked_log_softmax,
        mean_pool,
        mse,
        relation_log_softmax,
        soft_cross_entropy,
        soft_loss,
        soft_loss_per_example,
        summary_token,
        task_loss,
        task_loss_per_example,
        vocab_parallel_kl_divergence,
        vocab_parallel_soft_cross_entropy,
        vocab_parallel_soft_loss,
        vocab_parallel_task_loss,
        vocab_parallel_task_loss_per_example,
    )
    from gkd.methods.prediction import (
        hard_loss_claim,
        prediction_issues,
        prediction_terms,
        vocab_parallel_prediction,
    )
    from gkd.methods.spec import FeatureUse, MethodKind, MethodSpec, StageKind, load_schema
    from gkd.models.operations import (
        add_perturbation,
        compose,
        replace_with,
        swap_layers,
        write_positions,
        write_span,
    )
    from gkd.models.taps import LAYERS_OPERATION, VOCAB_SHARD, Operation
    from gkd.parallel.comm import (
        all_reduce_mean_over_tp,
        all_reduce_sum_over_tp,
        gather_along_dim,
        gather_heads,
        gather_last_dim,
        gather_over_dp,
        shard_along_dim,
        vocab_parallel_cross_entropy,
        vocab_parallel_soft_per_position,
    )
    from gkd.parallel.state import tp_rank, tp_world_size
    from gkd.plugins.registry import MethodRegistrar
