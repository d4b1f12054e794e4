"""The training loop of one stage, written once for teacher fine-tuning, plain training and
distillation: micro-batches through :func:`gkd.engine.step.distill_step`, DeepSpeed's
backward/step, method ``after_step``, metrics, evaluation, checkpoints and ``stop_after``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gkd import parallel
from gkd.config.run import RunConfig, StageConfig
from gkd.engine import checkpoint as ckpt
from gkd.engine.callbacks import Callbacks, StepInfo
from gkd.engine.data import BatchIterator, TaskDataset
from gkd.engine.early_stopping import EarlyStopWatch
from gkd.engine.evaluate import Evaluation, evaluate
from gkd.engine.fingerprint import teacher_references
from gkd.engine.metrics import MetricsLogger
from gkd.engine.progress import StageProgress
from gkd.engine.resume import ResumePoint, data_position, restore_training
from gkd.engine.rundir import write_failure
from gkd.engine.schedule import build_scheduler
from gkd.engine.step import (
    NonFiniteError,
    SelectedMethod,
    any_rank,
    describe_nonfinite,
    distill_step,
    ensure_finite,
    nonfinite_names,
    step_context,
)
from gkd.engine.teacher_cache import TeacherCache
from gkd.errors import GkdError
from gkd.parallel.comm import mean_over_dp
from gkd.parallel.placement import Placement
from gkd.parallel.zero import deepspeed_config, drop_stale_gradients, initialize_engine
from gkd.parallel.zero import partitioned_kind as optimizer_kind

if TYPE_CHECKING:
    from gkd.engine.analysis import StageAnalysis

_LOSS = "\x00loss"  # the total, carried with the terms through one DP reduction


class TrainingInterrupted(Exception):
    """Raised by ``stop_after``: the run stopped on purpose after a checkpoint."""


@dataclass
class StageTime:
    """Wall time of one stage trained in this process, and what of it was not training steps."""

    stage: str
    seconds: float = 0.0
    steps: int = 0
    examples: int = 0
    """Training examples the steps consumed, over all data-parallel ranks."""
    parts: dict[str, float] = field(default_factory=dict)
    """Seconds outside the steps: ``setup`` (engine, resume), ``evaluation``, ``checkpoints``, ``analysis``."""

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, Any]:
        """The ``timings.stages`` entry of ``summary.json``."""
        training = self.seconds - sum(self.parts.values())
        return {"stage": self.stage, "seconds": round(self.seconds, 2), "steps": self.steps,
                "examples": self.examples, "training_seconds": round(training, 2),
                "examples_per_s": round(self.examples / training, 1) if training > 0 else None,
                **{f"{k}_seconds": round(v, 2) for k, v in self.parts.items()}}


@dataclass
class RunProgress:
    """Where the run is; the loop advances it, checkpoints record it."""

    global_step: int = 0
    skipped_steps: int = 0
    """Steps whose update ``training.nonfinite: skip`` dropped (recorded in checkpoints)."""
    times: list[StageTime] = field(default_factory=list)
    """The stages this process trained, in order (not checkpointed: a resumed run times what it runs)."""


class Trainable(nn.Module):
    """Student + auxiliary model: the one module DeepSpeed optimises, shards and checkpoints."""

    def __init__(self, student: nn.Module, auxiliary: nn.ModuleDict) -> None:
        super().__init__()
        self.student = student
        self.auxiliary = auxiliary

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # DeepSpeed requires one; the step calls the parts
        return self.student(*args, **kwargs)


@dataclass
class Checkpointer:
    """Writes the student stages' checkpoints (teacher fine-tuning is not checkpointed)."""

    run: RunConfig
    teacher_paths: Callable[[], dict[str, Path]]
    """The teachers' current directories (fine-tuned and published ones included)."""
    labels: Callable[[], list[str] | None]

    def due(self, global_step: int) -> bool:
        every = self.run.checkpoint.every_steps
        return bool(every) and global_step % every == 0

    def save(self, stage_index: int, stage_iteration: int, global_step: int, *, model: nn.Module, auxiliary: nn.Module,
             optimizer: Any, scheduler: Any, iterator: BatchIterator, methods: Mapping[str, SelectedMethod],
             skipped_steps: int = 0, early_stopping: dict[str, Any] | None = None) -> Path:
        """Save a checkpoint; collective (every rank calls it, global rank 0 writes). Returns its directory.

        Raises:
            NonFiniteError: A weight is NaN or infinite: nothing is written.
            GkdError: The file system refused the write (full disk, read-only); no checkpoint is left half-written.
        """
        ensure_finite(model, f"checkpoint at global step {global_step}")
        ensure_finite(auxiliary, f"checkpoint at global step {global_step}")
        paths = self.teacher_paths()
        state = ckpt.CheckpointState(
            global_step=global_step, stage_index=stage_index, stage_iteration=stage_iteration,
            data_position=data_position(iterator), method_states={n: s.state for n, s in methods.items()},
            teachers=teacher_references(paths),
            extra={"teacher_paths": {k: str(v) for k, v in paths.items()}, "labels": self.labels(),
                   "skipped_steps": skipped_steps},
        )
        if early_stopping is not None:
            state.extra["early_stopping"] = early_stopping
        architecture = getattr(model, "model_config", None)
        if architecture is not None:  # what `gkd export --stage` rebuilds the student from (gkd.deploy.source)
            state.extra["student_model"] = dataclasses.asdict(architecture)
        try:
            return ckpt.save_checkpoint(self.run.run_dir, state, model=model, auxiliary=auxiliary, optimizer=optimizer,
                                        scheduler=scheduler, config=self.run.raw,
                                        keep_last=self.run.checkpoint.keep_last)
        except Exception as exc:
            reason = write_failure(exc)
            if reason is None:
                raise
            raise GkdError(f"checkpoint at global step {global_step}: cannot write under "
                           f"{self.run.run_dir / ckpt.CHECKPOINTS}: {reason}; the previous checkpoint is kept") from None


@dataclass
class StageJob:
    """One stage, ready to train."""

    index: int
    stage: StageConfig
    model: nn.Module
    """What the optimizer updates (the student, or the teacher being fine-tuned)."""
    models: Mapping[str, nn.Module]
    """Every model the methods may run, keyed ``student`` / ``teacher:NAME``."""
    train_data: TaskDataset
    eval_data: TaskDataset | None = None
    methods: dict[str, SelectedMethod] = field(default_factory=dict)
    checkpointer: Checkpointer | None = None
    analysis: StageAnalysis | None = None
    """Feature distances recorded at the stage's start, every ``analysis.every`` global steps and its end."""
    cache: TeacherCache | None = None
    """Serves the frozen teachers' outputs (``cache``); None: off."""


@dataclass
class LoopIO:
    """Where the loop reports: human lines, metrics (rank 0 only), progress display, early stop, callbacks."""

    echo: Callable[[str], None]
    metrics: MetricsLogger | None
    progress_bar: bool
    stop_after: int | None = None
    callbacks: Callbacks = field(default_factory=Callbacks)


def stage_steps(stage: StageConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a stage: ``steps``, or ``epochs`` worth of (accumulated) batches."""
    if stage.steps is not None:
        return stage.steps
    assert stage.epochs is not None
    return max(1, math.ceil(stage.epochs * batches_per_epoch / stage.training.grad_accum))


def train_stage(run: RunConfig, job: StageJob, progress: RunProgress, placement: Placement, io: LoopIO,
                resume: ResumePoint | None = None) -> Evaluation | None:
    """Train one stage to its end (or to ``stop_after``); returns the end-of-stage evaluation.

    Raises:
        TrainingInterrupted: ``stop_after`` was reached (after a checkpoint).
    """
    stage, training = job.stage, job.stage.training
    clock = StageTime(stage.name)
    progress.times.append(clock)
    started = time.perf_counter()
    if training.precision != "fp32" and placement.device.type != "cuda":
        raise GkdError(f"stages[{job.index}].training.precision: '{training.precision}' needs CUDA; use fp32 on CPU")
    iterator = BatchIterator(job.train_data, training.batch_size, seed=run.seed, rank=parallel.dp_rank(),
                             world_size=parallel.dp_world_size())
    total = stage_steps(stage, iterator.batches_per_epoch)
    auxiliary = placement.model(nn.ModuleDict({name: sel.method for name, sel in job.methods.items()}))
    ds_config = deepspeed_config(micro_batch=training.batch_size, grad_accum=training.grad_accum,
                                 max_grad_norm=training.max_grad_norm, precision=training.precision,
                                 zero=run.parallel.zero, data_parallel=parallel.dp_world_size())
    engine, optimizer, scheduler = initialize_engine(
        Trainable(job.model, auxiliary), stage.optimizer, lambda opt: build_scheduler(opt, stage.schedule, total),
        ds_config)
    start = 0
    if training.nonfinite == "skip" and (optimizer_kind(optimizer) is not None or training.precision != "fp32"):
        raise GkdError(f"stages[{job.index}].training.nonfinite: 'skip' needs parallel.zero.stage 0 and fp32 "
                       "(DeepSpeed's partitioned optimizers cannot drop one update); use 'stop'")
    watch = EarlyStopWatch.for_stage(training.early_stopping, resume)
    if resume is not None:
        progress.skipped_steps = int(resume.state.extra.get("skipped_steps", 0))
        start = restore_training(resume, model=job.model, auxiliary=auxiliary, optimizer=optimizer,
                                 scheduler=scheduler, iterator=iterator, methods=job.methods,
                                 echo=lambda line: io.echo(f"[{stage.name}] {line}"))
    if io.stop_after is not None and progress.global_step >= io.stop_after and start < total:
        # Resumed at or past the step to stop after: train nothing (not one step more).
        raise TrainingInterrupted(f"stopped after global step {progress.global_step} (--stop-after)")
    clock.parts["setup"] = time.perf_counter() - started
    if job.analysis is not None and start == 0:
        with clock.part("analysis"):
            job.analysis.record(step=0, global_step=progress.global_step, at="start")
    job.model.train()
    last = total  # the stage's last step (earlier when early stopping ends it)
    io.callbacks.stage_start(stage)
    shown = StageProgress(total=total, start=start, desc=f"[{job.index + 1}/{len(run.stages)}] {stage.name}",
                          bar=io.progress_bar and parallel.is_global_rank_zero(),
                          every=run.logging.every_steps if parallel.is_global_rank_zero() else 0, echo=io.echo)
    try:
        for iteration in range(start, total):
            contexts = {name: step_context(run.seed, stage.name, job.index, iterator.next_epoch, iteration, total, name)
                        for name in job.methods}
            sums: dict[str, float] = {}
            loss_value = 0.0
            skipped = False
            for micro in range(training.grad_accum):
                epoch = iterator.next_epoch
                result = distill_step(job.models, job.methods, contexts, placement.batch(next(iterator)),
                                      cache=job.cache)
                if job.cache is not None:
                    if iteration == 0 and micro == 0:
                        job.cache.check_used()
                    if iterator.next_epoch != epoch:  # an epoch's entries are on disk before the next epoch
                        job.cache.flush()
                loss_value += float(result.loss.detach()) / training.grad_accum
                for k, v in result.terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / training.grad_accum
                if (training.nonfinite == "skip" and micro == training.grad_accum - 1
                        and any_rank(bool(nonfinite_names(sums | {_LOSS: loss_value})))):
                    skipped = True
                    break
                engine.backward(result.loss)
                engine.step()
            if skipped:
                # No backward of the last micro-batch, so no optimizer or LR-schedule step; the
                # accumulated gradients are dropped and DeepSpeed's micro-step count kept aligned.
                engine.zero_grad()
                engine.micro_steps += 1
            drop_stale_gradients(optimizer)
            # One value per step for the whole (data-parallel) batch, the same on every rank.
            sums = mean_over_dp(sums | {_LOSS: loss_value})
            loss_value = sums.pop(_LOSS)
            progress.global_step += 1
            clock.steps += 1
            clock.examples += training.batch_size * training.grad_accum * parallel.dp_world_size()
            step = iteration + 1
            lr = float(optimizer.param_groups[0]["lr"])
            checked = {"loss": loss_value, **sums}
            norm = None if skipped else engine.get_global_grad_norm()
            if norm is not None:
                checked["grad_norm"] = float(norm)
            bad = nonfinite_names(checked)
            if skipped:
                progress.skipped_steps += 1
            if io.metrics is not None:
                io.metrics.log_train(stage=stage.name, step=step, global_step=progress.global_step,
                                     loss=loss_value, terms=sums, lr=lr,
                                     **({"nonfinite": bad, "skipped": skipped,
                                         "skipped_steps": progress.skipped_steps} if bad else {}))
            if bad and (not skipped or progress.skipped_steps > training.max_skipped_steps):
                what = "" if not skipped else (f" ({progress.skipped_steps} steps skipped, more than "
                                               f"training.max_skipped_steps: {training.max_skipped_steps})")
                raise NonFiniteError(
                    f"stages[{job.index}] '{stage.name}' step {step} (global step {progress.global_step}): "
                    f"non-finite {describe_nonfinite(checked)}{what}; stopped without saving it, the latest "
                    "checkpoint is the last good one. Lower optimizer.lr, set training.max_grad_norm, or set "
                    "training.nonfinite: skip")
            if skipped:
                io.echo(f"[{stage.name}] step {step}: non-finite {describe_nonfinite(checked)}; update skipped "
                        f"({progress.skipped_steps}/{training.max_skipped_steps})")
            else:
                for name, sel in job.methods.items():
                    own = {k.split(".", 1)[1]: v for k, v in sums.items() if k.startswith(name + ".")}
                    sel.method.after_step(contexts[name], sel.state, own)
            io.callbacks.step_end(StepInfo(stage.name, step, progress.global_step, loss_value, dict(sums), lr))
            shown.update(step, loss_value, lr)
            done = step == total
            if job.analysis is not None and job.analysis.due(progress.global_step, done):
                with clock.part("analysis"):
                    job.analysis.record(step=step, global_step=progress.global_step, at="end" if done else "step",
                                        loss=loss_value, terms=sums)
            if training.eval_every_steps and step % training.eval_every_steps == 0 and not done:
                with clock.part("evaluation"):
                    evaluation = _evaluate(run, job, step, progress, placement, io)
                if watch is not None and evaluation is not None and watch.update(evaluation):
                    done, last = True, step  # the stage ends here: checkpointed as finished
                    io.echo(f"[{stage.name}] early stopping at step {step}/{total}: {watch.describe()}")
            stop = io.stop_after is not None and progress.global_step >= io.stop_after
            if job.checkpointer is not None and (done or stop or job.checkpointer.due(progress.global_step)):
                with clock.part("checkpoints"):
                    if job.cache is not None:
                        job.cache.flush()
                    saved = job.checkpointer.save(job.index, step, progress.global_step, model=job.model,
                                                  auxiliary=auxiliary, optimizer=optimizer, scheduler=scheduler,
                                                  iterator=iterator, methods=job.methods,
                                                  skipped_steps=progress.skipped_steps,
                                                  early_stopping=watch.state() if watch is not None else None)
                io.callbacks.checkpoint(saved, progress.global_step)
            if stop and not done:
                raise TrainingInterrupted(f"stopped after global step {progress.global_step} (--stop-after)")
            if done:
                break
    finally:
        shown.close()
        if job.cache is not None:
            job.cache.flush()
    if job.cache is not None and parallel.is_global_rank_zero():
        io.echo(f"[{stage.name}] {job.cache.stats.describe()}")
    del engine
    with clock.part("evaluation"):
        evaluation = _evaluate(run, job, last, progress, placement, io)
    clock.seconds = time.perf_counter() - started
    io.callbacks.stage_end(stage, evaluation)
    return evaluation


def _evaluate(run: RunConfig, job: StageJob, step: int, progress: RunProgress, placement: Placement,
              io: LoopIO) -> Evaluation | None:
    if job.eval_data is None:
        return None
    ev = evaluate(job.model, job.eval_data, job.stage.training.eval_batch_size, placement, seed=run.seed)  # type: ignore[arg-type]
    scores = {ev.metric: ev.value, "loss": ev.loss}
    if io.metrics is not None:
        io.metrics.log_eval(stage=job.stage.name, step=step, global_step=progress.global_step, metrics=scores)
    io.callbacks.evaluate(job.stage.name, step, dict(scores))
    io.echo(f"[{job.stage.name}] step {step} eval {ev.metric}: {ev.value:.4f}")
    return ev


__all__ = ["Checkpointer", "LoopIO", "RunProgress", "StageJob", "StageTime", "Trainable", "TrainingInterrupted", "stage_steps",
           "train_stage"]
