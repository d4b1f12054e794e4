"""Recording teacher-student feature distances during training (the paper's App. A.2).

With ``analysis.every`` > 0 the loop calls :meth:`StageAnalysis.record` at the start of every
student stage, every ``every`` global steps and at the stage's end. A record runs the student and
the teachers once more on a fixed *probe* (the first ``analysis.probe_examples`` examples of one
split, the same for the whole run), measures every distance below for every mapped layer pair,
evaluates the task metric and appends one point to ``analysis.jsonl`` / ``analysis.csv``
(:mod:`gkd.analysis.records`; global rank 0 writes).

The pass is separate from the training step: features come from the models' taps through the
step's own machinery (:func:`gkd.engine.step.run_pass`), but only here are they asked for, so a
training step still extracts exactly what its methods request. It runs under ``no_grad``, in eval
mode, and leaves every RNG stream as it found it, so a run with analysis trains bitwise like one
without.

Distances (student layer ``i`` ↔ teacher layer ``layer_map[i]``, default ``round((i+1)·T/S) − 1``;
the embeddings, tag ``emb``, pair with the embeddings; each value is a mean over the probe's real
tokens — padding never counts):

====================  ==========================================================================
``hidden.mse``        MSE of the layer outputs (embeddings for ``emb``) — equal widths only
``hidden.cos``        1 − cosine of each token's vectors — equal widths only
``hidden.rel_kl``     KL(teacher ‖ student) of the token relations ``softmax(H·Hᵀ/√h)`` — any widths
``query|key|value``   ``.mse`` (equal head counts and head sizes) and ``.rel_kl`` (per head
                      ``softmax(Q·Qᵀ/√d)``, MiniLMv2's relations; with different head counts the
                      heads are concatenated into one relation)
``scores.mse``        attention scores (before the softmax), over the valid (query, key) pairs
``probs.mse``,        attention probabilities: MSE and KL(teacher ‖ student) per query row. Per
``probs.kl``          head with equal head counts, else of the head-averaged maps
``logits.kl_T<τ>``    KL(softmax(t/τ) ‖ softmax(s/τ)) of the logits (no τ² factor), tag ``out``,
                      for every ``analysis.temperatures``; only when the logits have equal shapes
====================  ==========================================================================

The KL of the attention scores is the KL of their softmax, i.e. ``probs.kl``; it is recorded once.
Under tensor parallelism the per-head features are gathered (every rank computes the full-head
values; rank 0 writes them), so the values do not depend on the layout.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gkd import parallel
from gkd.analysis.records import (
    ANALYSIS_FILE,
    EMBEDDINGS_LAYER,
    LOGITS_LAYER,
    AnalysisLog,
    DistanceKey,
    layer_tag,
)
from gkd.config.run import AnalysisConfig, DatasetConfig, RunConfig, StageConfig
from gkd.engine.assets import RunAssets
from gkd.engine.data import TaskDataset, make_batches
from gkd.engine.evaluate import evaluate
from gkd.engine.plan import MergedPass, ModelRequest
from gkd.engine.step import run_pass
from gkd.errors import GkdError
from gkd.methods.api import STUDENT, teacher_key
from gkd.methods.losses import (
    attention_kl,
    attention_valid_mask,
    cosine_distance,
    kl_divergence,
    mse,
    relation_log_softmax,
)
from gkd.models import GkdModel
from gkd.parallel.comm import gather_heads
from gkd.parallel.rng import megatron_rng_states, restore_megatron_rng

HEAD_ROLES = ("attention.query", "attention.key", "attention.value")
MAP_ROLES = ("attention.scores", "attention.probs")
LAYER_ROLES = ("output", *HEAD_ROLES, *MAP_ROLES)
"""The taps the analysis reads in every mapped layer."""


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer of each student layer: ``round((i+1)·T/S) − 1`` (halves round up); 6→3 gives ``[1, 3, 5]``."""
    return [math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1 for i in range(student_layers)]


def analysis_features(layers: Iterable[int]) -> set[str]:
    """The tap names one model records for the analysis of ``layers``."""
    return {"embeddings"} | {f"layers.{i}.{role}" for i in layers for role in LAYER_ROLES}


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore every RNG stream a run depends on (:mod:`gkd.parallel.rng`) when the block ends."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), megatron_rng_states(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        restore_megatron_rng(states[3])
        if states[4] is not None:
            torch.cuda.set_rng_state_all(states[4])


Where = tuple[str, str]
"""(teacher, layer tag) of the distances being added."""


@dataclass
class _Means:
    """Masked means accumulated over probe chunks as (sum, count), so the result is the mean over
    the whole probe whatever the chunking."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, where: Where, feature: str, mean: torch.Tensor, count: torch.Tensor | float) -> None:
        n = float(count)
        if n <= 0:
            return
        name = str(DistanceKey(*where, feature))
        self.sums[name] = self.sums.get(name, 0.0) + float(mean) * n
        self.counts[name] = self.counts.get(name, 0.0) + n

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


@dataclass(frozen=True)
class _Masks:
    tokens: torch.Tensor
    """``[b, s]`` bool: real tokens."""
    pairs: torch.Tensor
    """``[b, 1, s, s]`` bool: the (query, key) pairs attention may use."""

    @property
    def rows(self) -> torch.Tensor:
        """Query rows with at least one valid key, ``[b, 1, s]``."""
        return self.pairs.any(-1)


def _hidden(out: _Means, where: Where, s: torch.Tensor, t: torch.Tensor, m: _Masks) -> None:
    """``[b, s, h]`` features: MSE and cosine when the widths agree; the relation KL always."""
    tokens = m.tokens.sum()
    if s.shape == t.shape:
        out.add(where, "hidden.mse", mse(s, t, m.tokens), tokens * s.shape[-1])
        out.add(where, "hidden.cos", cosine_distance(s, t, m.tokens), tokens)
    relation = attention_kl(relation_log_softmax(s[:, None], m.pairs), relation_log_softmax(t[:, None], m.pairs),
                            m.pairs, log_probs=True)
    out.add(where, "hidden.rel_kl", relation, m.rows.sum())


def _concat_heads(x: torch.Tensor) -> torch.Tensor:
    """``[b, n, s, d]`` → one head ``[b, 1, s, n·d]``."""
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, 1, s, n * d)


def _per_head(out: _Means, where: Where, name: str, s: torch.Tensor, t: torch.Tensor, m: _Masks) -> None:
    """``[b, heads, s, d]`` features (query, key, value)."""
    if s.shape == t.shape:
        out.add(where, f"{name}.mse", mse(s, t, m.tokens[:, None]), m.tokens.sum() * s.shape[1] * s.shape[-1])
    if s.shape[1] != t.shape[1]:
        s, t = _concat_heads(s), _concat_heads(t)
    relation = attention_kl(relation_log_softmax(s, m.pairs), relation_log_softmax(t, m.pairs), m.pairs,
                            log_probs=True)
    out.add(where, f"{name}.rel_kl", relation, m.rows.sum() * s.shape[1])


def _maps(out: _Means, where: Where, scores: tuple[torch.Tensor, torch.Tensor],
          probs: tuple[torch.Tensor, torch.Tensor], m: _Masks) -> None:
    """``[b, heads, s, s]`` attention scores and probabilities; head-averaged when head counts differ."""
    zero = torch.zeros((), device=m.pairs.device)
    # Masked scores hold finfo.min: zero them before any arithmetic (a head mean would overflow).
    (ss, ts), (sp, tp) = [[torch.where(m.pairs, x, zero) for x in pair] for pair in (scores, probs)]
    if ss.shape[1] != ts.shape[1]:
        ss, ts, sp, tp = (x.mean(1, keepdim=True) for x in (ss, ts, sp, tp))
    heads = ss.shape[1]
    out.add(where, "scores.mse", mse(ss, ts, m.pairs), m.pairs.sum() * heads)
    out.add(where, "probs.mse", mse(sp, tp, m.pairs), m.pairs.sum() * heads)
    out.add(where, "probs.kl", attention_kl(sp, tp, m.pairs), m.rows.sum() * heads)


def _logits(out: _Means, where: Where, s: torch.Tensor | None, t: torch.Tensor | None, m: _Masks,
            temperatures: Sequence[float]) -> None:
    if s is None or t is None or s.shape != t.shape:
        return  # a teacher without this head (or with another label set) has no soft labels to compare
    token_level = s.dim() == 3
    count = m.tokens.sum() if token_level else s.shape[0]
    for tau in temperatures:
        # fp64: at high τ the two softmaxes agree to ~1e-7, below fp32's resolution of their KL
        kl = kl_divergence(s.double(), t.double(), tau, m.tokens if token_level else None, scale_by_t2=False)
        out.add(where, f"logits.kl_T{tau:g}", kl, count)


def _full(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Features in fp32, head-sharded ones gathered over TP (every rank then holds the same values)."""
    return {name: (gather_heads(v) if name.endswith(HEAD_ROLES + MAP_ROLES) else v).float()
            for name, v in features.items()}


def _layer_pair(out: _Means, where: Where, s: Mapping[str, torch.Tensor], i: int, t: Mapping[str, torch.Tensor],
                j: int, m: _Masks) -> None:
    """Every distance of student layer ``i`` to teacher layer ``j``."""
    _hidden(out, where, s[f"layers.{i}.output"], t[f"layers.{j}.output"], m)
    for role in HEAD_ROLES:
        _per_head(out, where, role.removeprefix("attention."), s[f"layers.{i}.{role}"], t[f"layers.{j}.{role}"], m)
    _maps(out, where, (s[f"layers.{i}.attention.scores"], t[f"layers.{j}.attention.scores"]),
          (s[f"layers.{i}.attention.probs"], t[f"layers.{j}.attention.probs"]), m)


def measure(student: GkdModel, teachers: Mapping[str, GkdModel], batches: Iterable[Mapping[str, torch.Tensor]],
            layer_maps: Mapping[str, Sequence[int]], temperatures: Sequence[float]) -> dict[str, float]:
    """Every distance between ``student`` and each teacher over ``batches`` (keys as
    :class:`~gkd.analysis.records.DistanceKey` strings), as means over the whole probe.

    Runs under ``no_grad`` with the student in eval mode (its mode is restored) and every RNG
    stream restored afterwards. Collective under TP and with partitioned teachers: every rank calls
    it with the same batches.
    """
    causal = student.model_config.family == "decoder"
    student_layers = range(student.model_config.num_layers)
    requests = {STUDENT: ModelRequest(analysis_features(student_layers))}
    requests |= {teacher_key(n): ModelRequest(analysis_features(set(layer_maps[n]))) for n in teachers}
    models: dict[str, torch.nn.Module] = {STUDENT: student} | {teacher_key(n): t for n, t in teachers.items()}
    out = _Means()
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), rng_untouched():
            for batch in batches:
                views = run_pass(models, MergedPass(dict(requests), {}), batch)
                masks = _Masks(batch["attention_mask"].bool(),
                               attention_valid_mask(batch["attention_mask"], causal=causal))
                s = _full(views[STUDENT].features)
                for name in teachers:
                    t = _full(views[teacher_key(name)].features)
                    _hidden(out, (name, EMBEDDINGS_LAYER), s["embeddings"], t["embeddings"], masks)
                    for i, j in zip(student_layers, layer_maps[name], strict=True):
                        _layer_pair(out, (name, layer_tag(i)), s, i, t, j, masks)
                    _logits(out, (name, LOGITS_LAYER), views[STUDENT].logits, views[teacher_key(name)].logits, masks,
                            temperatures)
    finally:
        student.train(was_training)
    return out.result()


class _Subset:
    """The first ``n`` examples of a dataset, readable by :func:`make_batches` and :func:`evaluate`."""

    def __init__(self, data: TaskDataset, n: int) -> None:
        self.data, self.n, self.task = data, min(n, len(data)), data.task

    def __len__(self) -> int:
        return self.n

    def collate(self, indices: Sequence[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.data.collate(indices, generator)


def _probe_split(run: RunConfig) -> tuple[str, DatasetConfig]:
    """``analysis.probe_split`` resolved to a split name and its dataset."""
    splits = {"eval": run.eval_data, "test": run.test_data, "train": run.train_data}
    choice = run.analysis.probe_split
    if choice == "auto":
        choice = next(name for name in ("eval", "test", "train") if splits[name] is not None)
    data = splits[choice]
    if data is None:
        raise GkdError(f"analysis.probe_split: '{choice}', but the config has no data.{choice}")
    return choice, data


def _layer_maps(config: AnalysisConfig, stage: StageConfig, student_layers: int,
                teachers: Mapping[str, GkdModel]) -> dict[str, list[int]]:
    maps = {}
    for name, teacher in teachers.items():
        depth = teacher.model_config.num_layers
        given = config.layer_map.get(name) if isinstance(config.layer_map, Mapping) else config.layer_map
        where = "analysis.layer_map" + (f".{name}" if isinstance(config.layer_map, Mapping) else "")
        if given is None:
            maps[name] = default_layer_map(depth, student_layers)
            continue
        if len(given) != student_layers:
            raise GkdError(f"{where}: {len(given)} entries, but the student of stage '{stage.name}' has "
                           f"{student_layers} layers (one teacher layer per student layer)")
        bad = [j for j in given if not 0 <= j < depth]
        if bad:
            raise GkdError(f"{where}: teacher layers {bad} are out of range for the {depth}-layer teacher '{name}' "
                           f"(0..{depth - 1})")
        maps[name] = list(given)
    return maps


class AnalysisRecorder:
    """The run's analysis: the probe, the teachers measured against and the log (rank 0).

    Args:
        run: The run config (``run.analysis.every`` > 0).
        assets: The run's assets (datasets, teachers, placement).
        keep_until: Resuming: ``(stage_index, step)`` of the resume point (see :class:`AnalysisLog`).

    Raises:
        GkdError: ``analysis.teachers`` names an unknown teacher, or ``analysis.probe_split`` a
            split the config lacks.
    """

    def __init__(self, run: RunConfig, assets: RunAssets, keep_until: tuple[int, float] | None) -> None:
        self.run, self.assets, self.config = run, assets, run.analysis
        known = [t.name for t in run.teachers] + [s.publish_as_teacher for s in run.stages if s.publish_as_teacher]
        unknown = [t for t in self.config.teachers or () if t not in known]
        if unknown:
            raise GkdError(f"analysis.teachers: unknown teacher(s) {', '.join(unknown)} "
                           f"(teachers: {', '.join(known) or 'none'})")
        self.split, self.split_data = _probe_split(run)
        self.log = AnalysisLog(run.run_dir, keep_until) if parallel.is_global_rank_zero() else None
        self.recorded = 0

    def probe_batches(self) -> list[dict[str, torch.Tensor]]:
        """The probe in chunks of ``analysis.batch_size``, on the run's device (the same at every point)."""
        probe = _Subset(self.assets.dataset(self.split_data), self.config.probe_examples)
        return [self.assets.placement.batch(b) for b in
                make_batches(probe, self.config.batch_size, shuffle=False, seed=self.run.seed)]  # type: ignore[arg-type]

    def stage(self, index: int, stage: StageConfig, student: GkdModel) -> StageAnalysis | None:
        """What the loop records in stage ``index`` (None: no teacher to measure against)."""
        names = [t for t in (self.config.teachers or stage.teachers) if t in stage.teachers]
        if not names:
            return None
        teachers = {name: self.assets.teacher(name) for name in names}
        maps = _layer_maps(self.config, stage, student.model_config.num_layers, teachers)
        return StageAnalysis(self, index, stage, student, teachers, maps)

    def summary(self) -> str:
        """One line for the end of the run (global rank 0)."""
        where = self.run.run_dir / ANALYSIS_FILE
        if not self.recorded:
            return ("analysis: nothing recorded by this run (its student stages had finished before); to record, "
                    "train again with --set checkpoint.resume=false")
        total = len(self.log.points) if self.log is not None else self.recorded
        return f"analysis: {total} point(s) in {where}; correlate them with: gkd analyze {self.run.run_dir}"


@dataclass
class StageAnalysis:
    """The analysis of one student stage; the loop asks :meth:`due` after each step and calls :meth:`record`."""

    recorder: AnalysisRecorder
    index: int
    stage: StageConfig
    student: GkdModel
    teachers: dict[str, GkdModel]
    layer_maps: dict[str, list[int]]
    _probe: list[dict[str, torch.Tensor]] | None = None

    def due(self, global_step: int, done: bool) -> bool:
        """After a step: every ``analysis.every`` global steps, and at the stage's last step."""
        return done or global_step % self.recorder.config.every == 0

    def record(self, *, step: int, global_step: int, at: str, loss: float | None = None,
               terms: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Measure, evaluate and (rank 0) append one point; collective, every rank calls it. Returns the point."""
        rec = self.recorder
        if self._probe is None:
            self._probe = rec.probe_batches()
        distances = measure(self.student, self.teachers, self._probe, self.layer_maps, rec.config.temperatures)
        data: Any = rec.assets.dataset(rec.split_data)
        if rec.config.metric == "probe":
            data = _Subset(data, rec.config.probe_examples)
        with rng_untouched():
            ev = evaluate(self.student, data, self.stage.training.eval_batch_size, rec.assets.placement, seed=rec.run.seed)
        point = {"stage": self.stage.name, "stage_index": self.index, "step": step, "global_step": global_step,
                 "at": at, "loss": loss, "terms": dict(terms) if terms is not None else None,
                 "metric": {"name": ev.metric, "value": ev.value, "loss": ev.loss,
                            "on": rec.split if rec.config.metric == "split" else "probe", "examples": ev.examples},
                 "probe": {"split": rec.split, "examples": sum(len(b["input_ids"]) for b in self._probe)},
                 "layer_maps": self.layer_maps, "distances": distances, "time": time.time()}
        if rec.log is not None:
            rec.log.append(point)
        rec.recorded += 1
        return point


__all__ = ["AnalysisRecorder", "StageAnalysis", "analysis_features", "default_layer_map", "measure",
           "rng_untouched"]
