"""The trainer: runs the stages of a run config in order. It only sequences; each of the
paper's processes has its own module:

=====================  ======================================================
building assets        :mod:`gkd.engine.assets` (data, labels, teachers, student)
one stage's training   :mod:`gkd.engine.loop` (through :mod:`gkd.engine.step`)
resuming               :mod:`gkd.engine.resume`
teacher-assistant      :mod:`gkd.engine.chain` (finished links: records, fingerprints, reuse)
evaluation             :mod:`gkd.engine.evaluate`
results and export     :mod:`gkd.engine.report`
=====================  ======================================================

A run is a sequence of stages sharing one student and one global step counter:
``train: teacher:NAME`` stages fine-tune a teacher and save it under
``<run_dir>/teachers/NAME`` (reused by a later run with the same inputs); other stages
train the student, with or without methods; ``student_init`` restarts the student,
``publish_as_teacher`` turns it into a teacher for later stages — a link of a
teacher-assistant chain, recorded when finished and reused by a later run whose inputs
(fingerprint) are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gkd import parallel
from gkd.analysis.records import remove_records
from gkd.atomic import atomic_write_json
from gkd.config.run import RunConfig, StageConfig, StudentInit
from gkd.engine import chain
from gkd.engine import checkpoint as ckpt
from gkd.engine.analysis import AnalysisRecorder
from gkd.engine.assets import RunAssets
from gkd.engine.build import build_methods, model_shape
from gkd.engine.cache_store import default_cache_dir
from gkd.engine.callbacks import Callback, Callbacks
from gkd.engine.chain import TEACHER_META, FinishedLink
from gkd.engine.data import epoch_batches
from gkd.engine.early_stopping import stopped_early
from gkd.engine.fingerprint import sha256_of_checkpoint
from gkd.engine.loop import (
    Checkpointer,
    LoopIO,
    RunProgress,
    StageJob,
    TrainingInterrupted,
    stage_steps,
    train_stage,
)
from gkd.engine.metrics import MetricsLogger
from gkd.engine.progress import progress_bar_wanted
from gkd.engine.report import finish_run, format_table
from gkd.engine.resume import ResumePoint, find_resume_point, restore_finished_stage
from gkd.engine.rundir import claim_run_dir
from gkd.engine.sinks import MetricSink, WandbSink
from gkd.engine.step import ensure_finite
from gkd.engine.teacher_cache import TeacherCache
from gkd.methods.api import STUDENT, teacher_key
from gkd.models import GkdModel, export_hf
from gkd.parallel.placement import Placement
from gkd.parallel.rng import seed_everything, stage_seed
from gkd.parallel.teacher_partition import partitioned_keys
from gkd.plugins.registry import MethodRegistry

_UNSET: Any = object()


def _on_rank_zero(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo`` on global rank 0; nothing on the other ranks (asked at each call: the process
    group may not exist yet when the trainer is made)."""

    def say(line: str) -> None:
        if parallel.is_global_rank_zero():
            echo(line)

    return say


class Trainer:
    """Run every stage of ``run``.

    Args:
        run: The validated run config.
        registry: Method registry (for the stages' methods).
        progress: Show a progress bar (default: ``logging.progress`` when standard error is a terminal).
        stop_after: Stop (with a checkpoint) once this global step is reached — for tests and
            for splitting a long run into jobs; the next run resumes.
        echo: Where human-readable lines go; called on global rank 0 only (under a launcher
            every rank runs the trainer, one of them reports).
        callbacks: :class:`~gkd.engine.callbacks.Callback` instances, called in order on global
            rank 0 at each stage start/end, step end, evaluation and checkpoint.
    """

    def __init__(self, run: RunConfig, registry: MethodRegistry, *, progress: bool | None = None,
                 stop_after: int | None = None, echo: Callable[[str], None] = print,
                 callbacks: Iterable[Callback] = ()) -> None:
        self.run = run
        self.registry = registry
        self.echo = _on_rank_zero(echo)
        self.callbacks = Callbacks(callbacks)
        self.stop_after = stop_after
        self.progress_bar = progress_bar_wanted(progress, run.logging.progress)
        self._reusable: Any = _UNSET
        self._analysis: AnalysisRecorder | None = None
        self._metrics: MetricsLogger | None = None

    def execute(self) -> dict[str, Any]:
        """Run all stages (resuming from the latest checkpoint when there is one, else reusing the
        finished links of a teacher-assistant chain); return the summary.

        Raises:
            RunDirError: The run or export directory is not writable, or another run holds it.
            NonFiniteError: A step went NaN/inf (``training.nonfinite``); nothing of it was saved.
        """
        run = self.run
        # Under torchrun or the deepspeed launcher this joins the launched job; a layout that does
        # not fit it fails here, on every rank alike.
        parallel.ensure_initialized(tp=run.parallel.tensor_parallel, seed=run.seed,
                                    data_parallel=run.parallel.expected_data_parallel, timeout_s=run.parallel.timeout_s)
        with claim_run_dir(run):  # before anything is written: probed, and one run at a time
            try:
                return self._execute()
            finally:
                # An interrupted run (stop_after, an error) still flushes its W&B/TensorBoard copies.
                if self._metrics is not None:
                    self._metrics.close()

    def _execute(self) -> dict[str, Any]:
        began = time.perf_counter()
        run = self.run
        seed_everything(run.seed)
        assets = RunAssets(run, Placement.for_this_process())
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # Every split, before any step: a bad eval or test file fails now, not after training; the
        # label vocabulary (which fingerprints depend on) comes with data.train.
        for line in assets.read_all_data():
            self.echo(line)
        resume = find_resume_point(run, self.echo, lambda changed: self._reusable_before(changed, assets))
        link = self._reusable_link(assets) if resume is None else None
        progress = RunProgress()
        if resume is not None:
            for name, path in resume.teacher_paths.items():
                assets.set_teacher_path(name, path)
            progress.global_step = resume.state.global_step
            self.echo(f"resuming from {resume.path} (global step {resume.state.global_step})")
        if link is not None and parallel.is_global_rank_zero():
            chain.restore_metrics(run, link)  # the reused stages' records, as they were logged
        kept = resume.state.global_step if resume is not None else link.global_step if link is not None else None
        # One writer: every rank computes the same metrics, global rank 0 records them.
        metrics = (MetricsLogger(run.run_dir, resume_global_step=kept, tensorboard=run.logging.tensorboard,
                                 sinks=self._wandb_sink(run)) if parallel.is_global_rank_zero() else None)
        self._metrics = metrics
        io = LoopIO(self.echo, metrics, self.progress_bar, self.stop_after, callbacks=self.callbacks)
        self._analysis = self._analysis_recorder(assets, resume, link)
        if assets.labels is not None and parallel.is_global_rank_zero():
            assets.labels.save(run.run_dir / "labels.json")
        checkpointer = Checkpointer(run, lambda: assets.teacher_paths,
                                    lambda: assets.labels.labels if assets.labels else None)
        started = time.perf_counter()
        student: GkdModel | None = None
        first = resume.state.stage_index if resume is not None else 0
        for index, stage in enumerate(run.stages):
            if index < first:
                continue  # done before the checkpoint; its teachers' paths came with it
            if link is not None and index <= link.index:
                student = self._reuse(index, stage, link, assets, progress, io) or student
                continue
            if resume is None or index != first:
                # Trained from its start: its draws (initialisation, dropout) depend on the seed and
                # the stage only, not on what earlier stages drew or whether they ran (a reused
                # teacher); a stage resumed mid-way gets its streams from the checkpoint instead.
                seed_everything(stage_seed(run.seed, index))
            if stage.trains_teacher is not None:
                self._finetune_teacher(index, stage, assets, progress, io)
            else:
                here = resume if resume is not None and index == first else None
                if student is None or stage.student_init is not None:
                    student = assets.build_student(self._student_init(index))
                restored = self._train_student(index, stage, student, assets, progress, io, checkpointer, here)
                self._publish(index, stage, student, assets, progress, restored=restored)
            if self.stop_after is not None and progress.global_step >= self.stop_after and index + 1 < len(run.stages):
                raise TrainingInterrupted(f"stopped after global step {progress.global_step} (--stop-after)")
        if self._analysis is not None:
            self.echo(self._analysis.summary())
        if student is not None:
            ensure_finite(student, "the exported student")
        return finish_run(assets, student, global_step=progress.global_step, seconds=time.perf_counter() - started,
                          metrics=metrics, startup_seconds=started - began, stages=progress.times)

    @staticmethod
    def _wandb_sink(run: RunConfig) -> list[Callable[[Path], MetricSink]]:
        """The opener of the W&B run of ``logging.wandb``, if configured."""
        options = run.logging.wandb
        if options is None:
            return []
        return [lambda run_dir: WandbSink(run_dir, name=run.name, project=options.project, mode=options.mode,
                                          config=run.raw, tags=options.tags)]

    def _analysis_recorder(self, assets: RunAssets, resume: ResumePoint | None,
                           link: FinishedLink | None) -> AnalysisRecorder | None:
        """The run's feature-distance recorder (``analysis``), keeping the points of the work it
        continues; without analysis, a fresh run removes the points of an earlier one."""
        keep = ((resume.state.stage_index, resume.state.stage_iteration) if resume is not None
                else (link.index, math.inf) if link is not None else None)
        if self.run.analysis.enabled:
            return AnalysisRecorder(self.run, assets, keep)
        if keep is None and parallel.is_global_rank_zero():
            remove_records(self.run.run_dir)
        return None

    def _student_init(self, index: int) -> StudentInit:
        """How the student of stage ``index`` started: the latest ``student_init`` up to it."""
        inits = [s.student_init for s in self.run.stages[: index + 1] if s.student_init is not None]
        return inits[-1] if inits else self.run.student.init

    def _train_student(self, index: int, stage: StageConfig, student: GkdModel, assets: RunAssets,
                       progress: RunProgress, io: LoopIO, checkpointer: Checkpointer,
                       resume: ResumePoint | None) -> bool:
        """Train the student through stage ``index``; True when ``resume`` was this stage's end (nothing to train)."""
        train_data = assets.dataset(stage.train_data)
        if resume is not None:
            batches = epoch_batches(len(train_data), stage.training.batch_size, world_size=parallel.dp_world_size())
            if resume.state.stage_iteration >= stage_steps(stage, batches) or stopped_early(resume):
                restore_finished_stage(resume, student)  # the checkpoint is this stage's end
                return True
        teachers = {t: assets.teacher_shape(t) for t in stage.used_teachers}
        methods = build_methods(self.run, stage, self.registry, model_shape(student.model_config), teachers)
        models: dict[str, nn.Module] = {STUDENT: student} | {teacher_key(t): assets.teacher(t) for t in teachers}
        for sel in methods.values():
            sel.method.setup(models)
        job = StageJob(index, stage, student, models, train_data,
                       assets.dataset(stage.eval_data) if stage.eval_data else None, methods, checkpointer,
                       self._analysis.stage(index, stage, student) if self._analysis is not None else None,
                       self._teacher_cache(stage, models, assets))
        train_stage(self.run, job, progress, assets.placement, io, resume)
        return False

    def _teacher_cache(self, stage: StageConfig, models: Mapping[str, nn.Module], assets: RunAssets) -> TeacherCache | None:
        """The stage's teacher-output cache (``cache``), or None when it is off or reads no teacher."""
        mode = self.run.cache_mode(stage)
        if mode == "off" or not stage.used_teachers:
            return None
        settings = dataclasses.replace(self.run.cache, mode=mode)
        teachers = {teacher_key(t): (models[teacher_key(t)], assets.teachers[t].path, assets.teachers[t].dtype)
                    for t in stage.used_teachers}
        echo = self.echo if parallel.is_global_rank_zero() else (lambda _: None)
        return TeacherCache.for_stage(settings, self.run.cache.dir or default_cache_dir(), stage=stage.name,
                                      teachers=teachers, tokenizer_dir=assets.tokenizer_dir(),
                                      max_length=self.run.task.max_length, tp_rank=parallel.tp_rank(),
                                      tp_size=parallel.tp_world_size(), partitioned=frozenset(partitioned_keys(models)),
                                      echo=lambda line: echo(f"[{stage.name}] {line}"))

    # ------------------------------------------------------------------ teachers made by the run

    def _finetune_teacher(self, index: int, stage: StageConfig, assets: RunAssets, progress: RunProgress,
                          io: LoopIO) -> None:
        """Plain training of a teacher; reused when a finished copy with the same inputs exists."""
        name = stage.trains_teacher
        assert name is not None
        source = assets.teachers[name].path
        out = chain.teacher_dir(self.run, name)
        fingerprint = self._fingerprint(stage, source, assets)
        meta_path = out / TEACHER_META
        meta = chain.read_meta(out) or {}
        if meta.get("fingerprint") == fingerprint:
            self.echo(f"[{stage.name}] reusing the fine-tuned teacher '{name}' in {out}")
            # Its steps still count, so later stages keep the global steps (checkpoint names,
            # --stop-after, analysis points) of the run that fine-tuned it.
            progress.global_step += int(meta.get("steps", 0))
        else:
            model = assets.trainable_teacher(name)
            job = StageJob(index, stage, model, {STUDENT: model}, assets.dataset(stage.train_data),
                           assets.dataset(stage.eval_data) if stage.eval_data else None)
            before = progress.global_step
            train_stage(self.run, job, progress, assets.placement, io)
            export_hf(model, out, tokenizer_dir=source)
            if parallel.is_global_rank_zero():
                atomic_write_json(meta_path, {"fingerprint": fingerprint, "source": str(source), "stage": stage.name,
                                              "steps": progress.global_step - before})
            parallel.barrier()
        assets.set_teacher_path(name, out)

    def _fingerprint(self, stage: StageConfig, source: Any, assets: RunAssets) -> str:
        """What a fine-tuned teacher depends on; equal fingerprints mean it can be reused."""
        described = {k: v for k, v in dataclasses.asdict(stage).items() if k != "student_init"}
        parts = {"source": sha256_of_checkpoint(source), "stage": described, "task": dataclasses.asdict(self.run.task),
                 "seed": self.run.seed, "labels": assets.labels.labels if assets.labels else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _link_fingerprint(self, index: int, assets: RunAssets) -> str:
        return chain.link_fingerprint(self.run, index, assets.labels.labels if assets.labels else None,
                                      parallel.dp_world_size())

    def _publish(self, index: int, stage: StageConfig, student: GkdModel, assets: RunAssets,
                 progress: RunProgress, *, restored: bool = False) -> None:
        """``publish_as_teacher``: export the student, make it a teacher for later stages and
        record the finished link (after the export, from the stage-end checkpoint). A run resumed
        at the stage's end keeps an export already recorded with the same fingerprint."""
        name = stage.publish_as_teacher
        if not name:
            return
        out = chain.teacher_dir(self.run, name)
        fingerprint = self._link_fingerprint(index, assets)
        if not restored or chain.finished_link(self.run, index, fingerprint) is None:
            if parallel.is_global_rank_zero():
                chain.forget_link(out)
            parallel.barrier()
            export_hf(student, out, tokenizer_dir=assets.tokenizer_dir())
            if parallel.is_global_rank_zero():
                chain.record_link(self.run, index, fingerprint, ckpt.checkpoint_dir(self.run.run_dir, progress.global_step))
            parallel.barrier()
        assets.set_teacher_path(name, out)

    # ------------------------------------------------------------------ reusing a finished chain

    def _reusable_link(self, assets: RunAssets) -> FinishedLink | None:
        """The last link of the longest prefix of stages that is finished with the current inputs:
        every link in it recorded with its fingerprint (teachers it read unchanged), every teacher
        fine-tuning stage in it reusable. None when the first link is not."""
        if self._reusable is not _UNSET:
            return self._reusable  # type: ignore[no-any-return]
        run, found = self.run, None
        if not any(s.publish_as_teacher for s in run.stages):
            self._reusable = None
            return None
        paths = {t.name: t.path for t in run.teachers}
        for index, stage in enumerate(run.stages):
            if stage.trains_teacher is not None:
                name = stage.trains_teacher
                out = chain.teacher_dir(run, name)
                if (chain.read_meta(out) or {}).get("fingerprint") != self._fingerprint(stage, paths[name], assets):
                    break
                paths[name] = out
            elif stage.publish_as_teacher:
                link = chain.finished_link(run, index, self._link_fingerprint(index, assets))
                if link is None or not chain.teachers_unchanged(link, paths):
                    break
                paths[link.teacher] = link.path
                found = link
        self._reusable = found
        return found

    def _reusable_before(self, stage_index: int, assets: RunAssets) -> bool:
        """Whether a finished link before stage ``stage_index`` can be reused (a changed later stage then
        starts over from it instead of refusing the checkpoints)."""
        link = self._reusable_link(assets)
        return link is not None and link.index < stage_index

    def _reuse(self, index: int, stage: StageConfig, link: FinishedLink, assets: RunAssets, progress: RunProgress,
               io: LoopIO) -> GkdModel | None:
        """Stage ``index`` of a reused chain prefix: nothing is trained; at the prefix's last link
        the stage-end state (student, RNG streams, global step) is restored."""
        if stage.trains_teacher is not None:
            self._finetune_teacher(index, stage, assets, progress, io)  # reusable: checked with the chain
            return None
        if stage.publish_as_teacher:
            out = chain.teacher_dir(self.run, stage.publish_as_teacher)
            assets.set_teacher_path(stage.publish_as_teacher, out)
            self.echo(f"[{stage.name}] reusing the finished link '{stage.publish_as_teacher}' in {out}")
        else:
            self.echo(f"[{stage.name}] part of the finished chain up to '{link.teacher}': not trained again")
        if index != link.index:
            return None
        student = assets.build_student(self._student_init(index))
        restore_finished_stage(link.point, student)
        progress.global_step = link.global_step
        return student


__all__ = ["TEACHER_META", "Trainer", "TrainingInterrupted", "format_table"]
