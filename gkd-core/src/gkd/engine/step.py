"""The distillation step, written once for every task, method combination and stage.

One call runs all forward passes the selected methods ask for on one micro-batch and returns
the weighted total loss plus every term, named ``<method>.<term>``. See
:mod:`gkd.methods.api` for the protocol seen from a method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gkd.engine.plan import MergedPass, ModelRequest, merge_plans
from gkd.engine.teacher_cache import TeacherCache
from gkd.errors import GkdError
from gkd.methods.api import STUDENT, Method, ModelView, PassPlan, PassView, StepContext
from gkd.methods.losses import (
    task_loss,
    task_loss_per_example,
    vocab_parallel_task_loss,
    vocab_parallel_task_loss_per_example,
)
from gkd.models.taps import VOCAB_SHARD
from gkd.parallel.comm import any_rank
from gkd.parallel.rng import seeded_generator
from gkd.parallel.teacher_partition import partitioned_keys, planned_on_some_rank

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_PASSES = 16


@dataclass
class SelectedMethod:
    """A method as used in one stage: runtime object, weight and its explicit state."""

    method: Method
    weight: float
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: torch.Tensor
    """Weighted sum of contributing terms (what is backpropagated)."""
    terms: dict[str, torch.Tensor]
    """Every term, weighted, keyed ``<method>.<term>`` (``task`` for plain training)."""


def method_generator(seed: int, stage: str, iteration: int, method: str) -> torch.Generator:
    """A generator that depends only on (seed, stage, iteration, method): reproducible on resume."""
    return seeded_generator(seed, stage, iteration, method)


def step_context(seed: int, stage: str, stage_index: int, epoch: int, iteration: int, total: int,
                 method: str) -> StepContext:
    return StepContext(stage, stage_index, epoch, iteration, total, method_generator(seed, stage, iteration, method))


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _run_model(model: nn.Module, batch: Mapping[str, torch.Tensor], features: set[str],
               operations: Mapping[str, Any], grad: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, model.capture(features=features, operations=operations) as captured:  # type: ignore[operator]
        out = model(**_model_inputs(batch))
    return out, dict(captured)


def _teacher_outputs(model: nn.Module, key: str, req: ModelRequest, batch: Mapping[str, torch.Tensor],
                     cache: TeacherCache | None, teacher_grad: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A teacher's logits and features: from ``cache`` when it may serve this request, else computed
    (and kept in the cache when it may be)."""
    features = req.capture_features()
    if cache is None or not cache.may_serve(key, req, teacher_grad):
        out, feats = _run_model(model, batch, features, req.composed_operations(), req.grad or teacher_grad)
        return out.logits, feats
    served = cache.lookup(key, features, batch)
    if served is not None:
        return served[1], served[0]
    out, feats = _run_model(model, batch, features | req.candidates, {}, False)
    cache.store(key, feats, out.logits, batch)
    return out.logits, {f: feats[f] for f in features}


def run_pass(models: Mapping[str, nn.Module], merged: MergedPass, batch: Mapping[str, torch.Tensor],
             *, teacher_grad: bool = False, cache: TeacherCache | None = None) -> dict[str, ModelView]:
    """Run every model the merged plan needs; the student with autograd, teachers without
    (unless a method asked for gradients through one), or from ``cache`` where it may serve them."""
    labels = batch.get("labels")
    results: dict[str, ModelView] = {}
    for key, req in merged.requests.items():
        if key not in models:
            raise KeyError(f"a method asked for model '{key}', but this stage only has {sorted(models)}")
        if key == STUDENT:
            out, feats = _run_model(models[key], batch, req.capture_features(), req.composed_operations(), True)
            logits = out.logits
        else:
            logits, feats = _teacher_outputs(models[key], key, req, batch, cache, teacher_grad)
        results[key] = ModelView(feats, logits, hard_losses=_hard_losses(models[key], logits, feats, labels))
    return results


def _hard_losses(model: nn.Module, logits: torch.Tensor | None, feats: Mapping[str, torch.Tensor],
                 labels: torch.Tensor | None) -> Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The hard losses of one model's results, computed when a method first reads one (a teacher's
    are seldom read; an LM's cost a log-softmax over the vocabulary each)."""

    def compute() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # One mean over all labelled tokens of the batch (or over examples), the convention
        # evaluation uses too; the per-example means serve per-sample weighting.
        if labels is not None and logits is not None:
            return task_loss(logits, labels), task_loss_per_example(logits, labels)
        if labels is not None and VOCAB_SHARD in feats:  # the gather was skipped: the same loss from shards
            vocab = model.model_config.vocab_size  # type: ignore[union-attr]
            return (vocab_parallel_task_loss(feats[VOCAB_SHARD], labels, vocab),
                    vocab_parallel_task_loss_per_example(feats[VOCAB_SHARD], labels, vocab))
        return None, None

    return compute


def _view(plan: PassPlan, results: Mapping[str, ModelView], batch: Mapping[str, torch.Tensor]) -> PassView:
    """A method's own view: only the models and features it requested."""
    return PassView(batch=batch, models={key: results[key].restricted(req.features) for key, req in plan.models.items()})


def _same_partitioned_passes(merged: MergedPass, shared: list[str], models: Mapping[str, nn.Module]) -> MergedPass:
    """Every data-parallel rank runs the partitioned teachers that some rank planned in this pass
    (their all-gathers must pair up), after the other models and in the stage's order; a teacher
    this rank did not plan runs with an empty request and no method reads its result."""
    run = planned_on_some_rank(shared, merged.requests, models)
    requests = {k: r for k, r in merged.requests.items() if k not in shared}
    requests |= {k: merged.requests.get(k, ModelRequest()) for k in run}
    return MergedPass(requests, merged.plans)


def distill_step(models: Mapping[str, nn.Module], methods: Mapping[str, SelectedMethod],
                 contexts: Mapping[str, StepContext], batch: Mapping[str, torch.Tensor], *,
                 cache: TeacherCache | None = None) -> StepResult:
    """Forward passes + losses of one micro-batch. ``methods`` empty means plain training.
    ``cache`` serves the frozen teachers' outputs it may serve (:mod:`gkd.engine.teacher_cache`)."""
    if not methods:
        out = run_pass(models, merge_plans({}), batch)[STUDENT]
        if out.task_loss is None:
            raise ValueError("plain training needs labels in the batch")
        return StepResult(out.task_loss, {"task": out.task_loss})

    terms: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    previous: dict[str, PassView | None] = dict.fromkeys(methods)
    active = list(methods)
    shared = partitioned_keys(models)  # teachers[].partition: every data-parallel rank must run them alike
    for pass_index in range(MAX_PASSES):
        plans: dict[str, PassPlan] = {}
        for name in active:
            sel = methods[name]
            plan = sel.method.plan(contexts[name], sel.state, pass_index, previous[name])
            if plan is None and pass_index == 0:
                raise RuntimeError(f"method '{name}' returned no plan for pass 0")
            if plan is not None:
                plans[name] = plan
        if not plans and not shared:
            break
        merged = merge_plans(plans, include_student=pass_index == 0)
        if shared:
            merged = _same_partitioned_passes(merged, shared, models)
            if not merged.requests:
                break
        results = run_pass(models, merged, batch, cache=cache)
        for name, plan in plans.items():
            sel = methods[name]
            view = _view(plan, results, batch)
            method_terms = sel.method.loss(contexts[name], sel.state, pass_index, view)
            view.terms = method_terms
            previous[name] = view
            for term, value in method_terms.items():
                key = f"{name}.{term}" if pass_index == 0 else f"{name}.pass{pass_index}.{term}"
                weighted = sel.weight * value
                if "/" in term:  # a part of another term (e.g. one layer pair's): logged, never added
                    terms[key] = weighted.detach()
                    continue
                terms[key] = weighted
                if plan.contributes_to_loss:
                    total = weighted if total is None else total + weighted
        active = list(plans)
    else:
        raise RuntimeError(f"methods {active} asked for more than {MAX_PASSES} forward passes in one step")
    if total is None:
        raise RuntimeError("the selected methods produced no loss term for this step")
    return StepResult(total, terms)


# ------------------------------------------------------------------ non-finite losses and weights

class NonFiniteError(GkdError):
    """Training produced a non-finite loss, gradient norm or weight; the run stops (exit code 1:
    the input was valid, the training diverged) without writing a checkpoint or export of it."""


def nonfinite_names(values: Mapping[str, float]) -> list[str]:
    """The names of the values that are NaN or infinite, in order."""
    return [name for name, value in values.items() if not math.isfinite(value)]


def describe_nonfinite(values: Mapping[str, float]) -> str:
    """``loss=nan, kd.kl=inf``: the non-finite ones of ``values`` (for error lines)."""
    return ", ".join(f"{name}={values[name]}" for name in nonfinite_names(values))


def local_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """The parameters this rank holds of ``module`` (its ZeRO-3 partitions where partitioned)."""
    for param in module.parameters():
        yield param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite on every rank (one all-reduce in a job)."""
    return not any_rank(any(not bool(torch.isfinite(t).all()) for t in local_tensors(module) if t.numel()))


def ensure_finite(module: nn.Module, what: str) -> None:
    """Refuse to write ``module`` (a checkpoint, an export) when one of its weights is not finite.

    Raises:
        NonFiniteError: Some parameter is NaN or infinite (on any rank).
    """
    if not all_finite(module):
        raise NonFiniteError(f"{what}: the weights hold NaN or infinite values; not written "
                             "(training.nonfinite stops a run at the step that produced them)")
