"""The trainer: runs the stages of a run config, checkpoints, evaluates and exports.

The loop itself is short; everything a method does happens in :func:`gkd.engine.step.distill_step`.
A run is a sequence of stages sharing one student and one global step counter:

* ``train: teacher:NAME`` stages fine-tune a teacher (plain training) and save it under
  ``<run_dir>/teachers/NAME``; a later run with the same inputs reuses it.
* other stages train the student, with or without distillation methods; the student carries
  over, ``student_init`` restarts it, ``publish_as_teacher`` turns it into a teacher.

Checkpoints (student stages) hold everything needed to continue bit for bit: weights, method
parameters and state, optimizer, schedule, data position and every RNG stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd import parallel
from gkd.atomic import atomic_write_json
from gkd.config.run import RunConfig, StageConfig, StudentInit
from gkd.engine import checkpoint as ckpt
from gkd.engine.build import build_methods, model_shape
from gkd.engine.data import BatchIterator, LabelVocab, TaskDataset, Tokenizer, build_dataset, make_batches
from gkd.engine.metrics import MetricsLogger, plot_losses
from gkd.engine.schedule import build_scheduler
from gkd.engine.step import SelectedMethod, distill_step, step_context
from gkd.errors import GkdError
from gkd.methods.api import STUDENT, ModelShape, teacher_key
from gkd.methods.losses import task_loss_per_example
from gkd.models import GkdModel, ModelConfig, count_parameters, export_hf, from_pretrained, load_model_config
from gkd.models.init import pretrained_student, random_student, truncated_student
from gkd.parallel.zero import deepspeed_config, initialize_engine
from gkd.plugins.registry import MethodRegistry

HEAD_FOR_TASK = {"sequence_classification": "classification", "masked_lm": "mlm", "causal_lm": "lm"}
TEACHER_META = "gkd-teacher.json"


class TrainingInterrupted(Exception):
    """Raised by ``stop_after``: the run stopped on purpose after a checkpoint."""


@dataclass
class Evaluation:
    metric: str
    value: float
    loss: float
    examples: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.examples / max(self.seconds, 1e-9)


@dataclass
class TrainerState:
    """Everything that changes while a run progresses (and goes into checkpoints)."""

    global_step: int = 0
    stage_index: int = 0
    stage_iteration: int = 0
    teacher_paths: dict[str, str] = field(default_factory=dict)
    """Current checkpoint directory of every teacher (fine-tuned and published ones included)."""
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)


def _megatron_rng_states() -> dict[str, list[int]]:
    from megatron.core.tensor_parallel import random as mrandom

    return {name: state.tolist() for name, state in mrandom.get_cuda_rng_tracker().get_states().items()}


def _seed_everything(seed: int) -> None:
    """Same seed, same run: the global RNGs and megatron's named streams (TP-region dropout)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.get_cuda_rng_tracker().reset()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _restore_megatron_rng(states: Mapping[str, list[int]]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if states:
        mrandom.get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in states.items()})


class _Trainable(nn.Module):
    """Student + auxiliary model: the one module DeepSpeed optimises, shards and checkpoints."""

    def __init__(self, student: nn.Module, auxiliary: nn.ModuleDict) -> None:
        super().__init__()
        self.student = student
        self.auxiliary = auxiliary

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # DeepSpeed requires one; the step calls the parts
        return self.student(*args, **kwargs)


class Trainer:
    """Run every stage of ``run``.

    Args:
        run: The validated run config.
        registry: Method registry (for the stages' methods).
        progress: Show a progress bar (default: the config's ``logging.progress`` on a TTY).
        stop_after: Stop (with a checkpoint) once this global step is reached — for tests and
            for splitting a long run into jobs; the next run resumes.
        echo: Where human-readable lines go.
    """

    def __init__(self, run: RunConfig, registry: MethodRegistry, *, progress: bool | None = None,
                 stop_after: int | None = None, echo: Callable[[str], None] = print) -> None:
        self.run = run
        self.registry = registry
        self.progress = run.logging["progress"] and sys.stderr.isatty() if progress is None else progress
        self.stop_after = stop_after
        self.echo = echo
        self.run_dir = Path(run.run_dir)
        self.state = TrainerState(teacher_paths={t.name: str(t.path) for t in run.teachers})
        self.student: GkdModel | None = None
        self._tokenizer: Tokenizer | None = None
        self._labels: LabelVocab | None = None
        self._datasets: dict[Any, TaskDataset] = {}
        self._teachers: dict[str, GkdModel] = {}
        self.metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ setup

    @property
    def task(self) -> str:
        return str(self.run.task["type"])

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            source = self._tokenizer_dir()
            self._tokenizer = Tokenizer.from_dir(source, int(self.run.task["max_length"]))
        return self._tokenizer

    def _tokenizer_dir(self) -> Path:
        init = self.run.student_init
        if init.teacher is not None:
            return Path(self.state.teacher_paths[init.teacher])
        if self.run.teachers:
            return Path(self.state.teacher_paths[self.run.teachers[0].name])
        assert init.path is not None
        return init.path / "export" if init.strategy == "run" else init.path

    def dataset(self, ds: Any) -> TaskDataset:
        key = (str(ds.path), ds.format, ds.text_field, ds.label_field, ds.limit)
        if key not in self._datasets:
            data, labels = build_dataset(ds, self.tokenizer(), self.run.task, seed=self.run.seed, labels=self._labels)
            if self._labels is None and labels is not None:
                self._labels = labels
                declared = self.run.task.get("num_labels")
                if declared is not None and declared != len(labels.labels):
                    raise GkdError(f"task.num_labels is {declared}, but the training data has {len(labels.labels)} "
                                   f"labels ({', '.join(labels.labels)})")
            self._datasets[key] = data
        return self._datasets[key]

    def _build_label_vocabulary(self) -> None:
        """Classification labels come from the run's main training split (``data.train``)."""
        if self.task == "sequence_classification":
            self.dataset(self.run.train_data)

    def _model_config(self, path: Path, **overrides: Any) -> ModelConfig:
        head = HEAD_FOR_TASK[self.task]
        extra: dict[str, Any] = {}
        if head == "classification":
            assert self._labels is not None
            extra |= {"num_labels": len(self._labels.labels), "id2label": dict(enumerate(self._labels.labels))}
        return load_model_config(path, head=head, **(extra | overrides))

    def _teacher_config(self, path: Path) -> ModelConfig:
        """The task's head when the checkpoint has it; otherwise the checkpoint's own head (a
        pre-trained teacher without a task head still serves feature-based methods)."""
        own = load_model_config(path)
        return self._model_config(path) if own.head == HEAD_FOR_TASK[self.task] else own

    def teacher(self, name: str) -> GkdModel:
        """A frozen teacher in eval mode (loaded once per checkpoint directory)."""
        path = Path(self.state.teacher_paths[name])
        cached = self._teachers.get(name)
        if cached is not None and getattr(cached, "_gkd_path", None) == str(path):
            return cached
        model = from_pretrained(path, self._teacher_config(path), strict=True, device="cpu")
        model.eval()
        model.requires_grad_(False)
        model._gkd_path = str(path)  # type: ignore[attr-defined]
        self._teachers[name] = model
        return model

    def teacher_shape(self, name: str) -> ModelShape:
        return model_shape(self._teacher_config(Path(self.state.teacher_paths[name])))

    def build_student(self, init: StudentInit) -> GkdModel:
        arch = self.run.student_architecture
        overrides = {k2: arch[k1] for k1, k2 in (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                                                  ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_kv_heads"),
                                                  ("ffn_hidden_size", "ffn_hidden_size")) if k1 in arch}
        if "num_attention_heads" in overrides and "num_kv_heads" not in overrides:
            overrides["num_kv_heads"] = overrides["num_attention_heads"]
        seed = self.run.seed
        if init.strategy in ("pretrained", "run"):
            assert init.path is not None
            path = init.path / "export" if init.strategy == "run" else init.path
            return pretrained_student(path, self._model_config(path, **overrides), seed=seed)
        source = Path(self.state.teacher_paths[init.teacher]) if init.teacher else init.path
        assert source is not None
        layers: Any = list(init.layers) if isinstance(init.layers, tuple) else init.layers
        depth = len(layers) if isinstance(layers, list) else (init.num_layers or arch.get("num_layers"))
        if depth is not None:
            overrides["num_layers"] = depth
        cfg = self._model_config(source, **overrides)
        if init.strategy == "random":
            return random_student(cfg, seed=seed)
        return truncated_student(cfg, source, layers=layers, seed=seed)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: GkdModel, ds: Any, batch_size: int) -> Evaluation:
        """Accuracy (classification) or perplexity (LM) on a split, with inference throughput."""
        data = self.dataset(ds)
        was_training = model.training
        model.eval()
        correct = total = 0
        loss_sum = tokens = 0.0
        start = time.perf_counter()
        for batch in make_batches(data, batch_size, shuffle=False, seed=self.run.seed):
            out = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
            per_example = task_loss_per_example(out.logits, batch["labels"])
            if self.task == "sequence_classification":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
                loss_sum += float(per_example.sum())
            else:
                n = (batch["labels"] != -100).sum(-1).float()
                loss_sum += float((per_example * n).sum())
                tokens += float(n.sum())
                total += len(batch["labels"])
        seconds = time.perf_counter() - start
        model.train(was_training)
        if self.task == "sequence_classification":
            return Evaluation("accuracy", correct / max(total, 1), loss_sum / max(total, 1), total, seconds)
        mean = loss_sum / max(tokens, 1.0)
        return Evaluation("perplexity", math.exp(min(mean, 50.0)), mean, total, seconds)

    # ------------------------------------------------------------------ stages

    def _stage_steps(self, stage: StageConfig, iterator: BatchIterator) -> int:
        accum = int(stage.training["grad_accum"])
        if stage.steps is not None:
            return stage.steps
        assert stage.epochs is not None
        return max(1, math.ceil(stage.epochs * iterator.batches_per_epoch / accum))

    def _fingerprint(self, stage: StageConfig, source: Path) -> str:
        """What a fine-tuned teacher depends on; equal fingerprints mean it can be reused."""
        parts = {
            "source": ckpt.sha256_of_checkpoint(source), "stage": _jsonable(stage), "task": self.run.task,
            "seed": self.run.seed, "labels": self._labels.labels if self._labels else None,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def finetune_teacher(self, index: int, stage: StageConfig) -> None:
        name = stage.trains_teacher
        assert name is not None
        source = Path(self.state.teacher_paths[name])
        out = self.run_dir / "teachers" / name
        fingerprint = self._fingerprint(stage, source)
        meta_path = out / TEACHER_META
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
            self.echo(f"[{stage.name}] reusing the fine-tuned teacher '{name}' in {out}")
            self.state.teacher_paths[name] = str(out)
            return
        model = from_pretrained(source, self._model_config(source), strict=False, device="cpu", seed=self.run.seed)
        self._train(index, stage, model, methods={})
        export_hf(model, out, tokenizer_dir=source)
        atomic_write_json(meta_path, {"fingerprint": fingerprint, "source": str(source), "stage": stage.name})
        self.state.teacher_paths[name] = str(out)

    def train_student(self, index: int, stage: StageConfig, resume: ckpt.CheckpointState | None,
                      resume_path: Path | None) -> None:
        if self.student is None or stage.student_init is not None:
            self.student = self.build_student(stage.student_init or self.run.student_init)
        student = self.student
        teacher_names = list(stage.teachers) if stage.methods else []
        shapes = {t: self.teacher_shape(t) for t in teacher_names}
        methods = build_methods(self.run, stage, self.registry, model_shape(student.model_config), shapes)
        models: dict[str, nn.Module] = {STUDENT: student}
        for t in {t for entry in stage.methods for t in entry.teachers}:
            models[teacher_key(t)] = self.teacher(t)
        for sel in methods.values():
            sel.method.setup(models)
        self._train(index, stage, student, methods, models=models, resume=resume, resume_path=resume_path)
        self._publish(stage, student)

    def _publish(self, stage: StageConfig, student: GkdModel) -> None:
        """``publish_as_teacher``: export the student and make it a teacher for later stages."""
        if stage.publish_as_teacher:
            out = self.run_dir / "teachers" / stage.publish_as_teacher
            export_hf(student, out, tokenizer_dir=self._tokenizer_dir())
            self.state.teacher_paths[stage.publish_as_teacher] = str(out)

    def _train(self, index: int, stage: StageConfig, model: GkdModel, methods: dict[str, SelectedMethod], *,
               models: dict[str, nn.Module] | None = None, resume: ckpt.CheckpointState | None = None,
               resume_path: Path | None = None) -> None:
        """The training loop of one stage (``model`` is what the optimizer updates)."""
        models = models or {STUDENT: model}
        training = stage.training
        if training["precision"] != "fp32" and not torch.cuda.is_available():
            raise GkdError(f"stages[{index}].training.precision: '{training['precision']}' needs CUDA; use fp32 on CPU")
        data = self.dataset(stage.train_data)
        iterator = BatchIterator(data, int(training["batch_size"]), seed=self.run.seed,
                                 rank=_dp_rank(), world_size=_dp_size())
        total = self._stage_steps(stage, iterator)
        auxiliary = nn.ModuleDict({name: sel.method for name, sel in methods.items()})
        trainable = _Trainable(model, auxiliary)
        config = deepspeed_config(micro_batch=int(training["batch_size"]), grad_accum=int(training["grad_accum"]),
                                  max_grad_norm=float(training["max_grad_norm"]), precision=training["precision"],
                                  zero=self.run.parallel.zero, data_parallel=_dp_size())
        engine, optimizer, scheduler = initialize_engine(
            trainable, stage.optimizer, lambda opt: build_scheduler(opt, stage.schedule, total), config)
        checkpointed = stage.trains_teacher is None
        start = 0
        if resume is not None and resume_path is not None:
            saved = bool(resume.extra.get("optimizer_saved", True))
            if not saved:
                self.echo(f"[{stage.name}] the checkpoint holds no optimizer state (ZeRO stage "
                          f"{self.run.parallel.zero.stage}): Adam moments restart at step {resume.stage_iteration}")
            ckpt.load_checkpoint(resume_path, model=model, auxiliary=auxiliary, optimizer=optimizer if saved else None,
                                 scheduler=scheduler, restore_rng=True)
            _restore_megatron_rng(resume.extra.get("megatron_rng", {}))
            iterator.load_state_dict(resume.data_position)
            for name, sel in methods.items():
                sel.state = dict(resume.method_states.get(name, sel.state))
            start = resume.stage_iteration
        model.train()
        bar = _progress(self.progress and parallel.is_global_rank_zero(), total, start, f"[{index + 1}/{len(self.run.stages)}] {stage.name}")
        every = int(self.run.checkpoint["every_steps"])
        accum = int(training["grad_accum"])
        for iteration in range(start, total):
            contexts = {name: step_context(self.run.seed, stage.name, index, iterator.epoch, iteration, total, name)
                        for name in methods}
            sums: dict[str, float] = {}
            loss_value = 0.0
            for _ in range(accum):
                batch = next(iterator)
                result = distill_step(models, methods, contexts, batch)
                engine.backward(result.loss)
                engine.step()
                loss_value += float(result.loss.detach()) / accum
                for k, v in result.terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
            for name, sel in methods.items():
                sel.method.after_step(contexts[name], sel.state,
                                      {k.split(".", 1)[1]: v for k, v in sums.items() if k.startswith(name + ".")})
            self.state.global_step += 1
            self.state.stage_iteration = iteration + 1
            lr = float(optimizer.param_groups[0]["lr"])
            if self.metrics is not None:
                self.metrics.log_train(stage=stage.name, step=iteration + 1, global_step=self.state.global_step,
                                   loss=loss_value, terms=sums, lr=lr)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            done = iteration + 1 == total
            stop = self.stop_after is not None and self.state.global_step >= self.stop_after
            if checkpointed and (done or stop or (every and self.state.global_step % every == 0)):
                self._save(stage, model, auxiliary, optimizer, scheduler, iterator, methods)
            if stop and not done:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(f"stopped after global step {self.state.global_step} (--stop-after)")
        if bar is not None:
            bar.close()
        if stage.eval_data is not None:
            ev = self.evaluate(model, stage.eval_data, int(training["eval_batch_size"]))
            if self.metrics is not None:
                self.metrics.log_eval(stage=stage.name, step=total, global_step=self.state.global_step,
                                  metrics={ev.metric: ev.value, "loss": ev.loss})
            self.echo(f"[{stage.name}] eval {ev.metric}: {ev.value:.4f}")
        del engine

    def _save(self, stage: StageConfig, model: nn.Module, auxiliary: nn.Module, optimizer: Any, scheduler: Any,
              iterator: BatchIterator, methods: Mapping[str, SelectedMethod]) -> None:
        refs = {name: Path(p) for name, p in self.state.teacher_paths.items()}
        state = ckpt.CheckpointState(
            global_step=self.state.global_step, stage_index=self.run.stages.index(stage),
            stage_iteration=self.state.stage_iteration, data_position=iterator.state_dict(),
            method_states={n: s.state for n, s in methods.items()},
            teachers=ckpt.teacher_references(refs),
            extra={"teacher_paths": self.state.teacher_paths, "megatron_rng": _megatron_rng_states(),
                   "labels": self._labels.labels if self._labels else None,
                   "optimizer_saved": self._optimizer_checkpointed},
        )
        ckpt.save_checkpoint(self.run_dir, state, model=model, auxiliary=auxiliary,
                             optimizer=optimizer if self._optimizer_checkpointed else None,
                             scheduler=scheduler, config=self.run.raw, keep_last=int(self.run.checkpoint["keep_last"]))

    @property
    def _optimizer_checkpointed(self) -> bool:
        # With ZeRO 0 the torch optimizer holds the whole state; ZeRO 1-3 partition it inside
        # DeepSpeed objects that gkd does not serialise yet (DeepSpeed's own format pickles).
        return self.run.parallel.zero.stage == 0

    # ------------------------------------------------------------------ the run

    def _resume_point(self) -> tuple[ckpt.CheckpointState | None, Path | None]:
        checkpoints = self.run_dir / ckpt.CHECKPOINTS
        if not self.run.checkpoint["resume"]:
            if checkpoints.exists():  # starting over: older steps must not mix with the new ones
                self.echo(f"checkpoint.resume is false: removing the old checkpoints in {checkpoints}")
                shutil.rmtree(checkpoints)
            return None, None
        path = ckpt.find_latest(self.run_dir)
        if path is None:
            return None, None
        saved = json.loads((path / "config.json").read_text())
        changed = config_differences(saved, self.run.raw)
        if changed:
            raise GkdError(
                f"{self.run_dir} holds checkpoints of a different config (changed: {', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}); use another run_dir, or set checkpoint.resume: false "
                "to start over (fine-tuned teachers are still reused)"
            )
        state = ckpt.CheckpointState.from_dict(json.loads((path / "state.json").read_text()))
        return state, path

    def execute(self) -> dict[str, Any]:
        """Run all stages (resuming from the latest checkpoint when there is one); return the summary."""
        parallel.ensure_initialized(tp=self.run.parallel.tensor_parallel, seed=self.run.seed)
        _seed_everything(self.run.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume, resume_path = self._resume_point()
        if resume is not None:
            saved_paths = resume.extra.get("teacher_paths", {})
            ckpt.verify_teachers(resume.teachers, ckpt.teacher_references({k: Path(v) for k, v in saved_paths.items()}))
            self.state.teacher_paths.update(saved_paths)
            self.state.global_step = resume.global_step
            self.echo(f"resuming from {resume_path} (global step {resume.global_step})")
        # One writer: every rank computes the same metrics, global rank 0 records them.
        self.metrics = (MetricsLogger(self.run_dir, resume_global_step=resume.global_step if resume else None)
                        if parallel.is_global_rank_zero() else None)
        self._build_label_vocabulary()
        if self._labels is not None:
            self._labels.save(self.run_dir / "labels.json")
        started = time.perf_counter()
        for index, stage in enumerate(self.run.stages):
            if resume is not None and index < resume.stage_index:
                if stage.trains_teacher is None and (stage.student_init is not None or self.student is None):
                    self.student = None  # rebuilt (and overwritten by the checkpoint) when the resumed stage starts
                continue
            if stage.trains_teacher is not None:
                self.finetune_teacher(index, stage)
                continue
            resuming_here = resume is not None and index == resume.stage_index
            if resuming_here and resume is not None and resume.stage_iteration >= self._planned_steps(stage):
                self._load_finished_stage(stage, resume_path)
                resume = None
                continue
            self.train_student(index, stage, resume if resuming_here else None, resume_path if resuming_here else None)
            resume = None
        summary = self.finish(time.perf_counter() - started)
        return summary

    def _planned_steps(self, stage: StageConfig) -> int:
        iterator = BatchIterator(self.dataset(stage.train_data), int(stage.training["batch_size"]), seed=self.run.seed,
                                 rank=_dp_rank(), world_size=_dp_size())
        return self._stage_steps(stage, iterator)

    def _load_finished_stage(self, stage: StageConfig, path: Path | None) -> None:
        """The checkpoint is the end of ``stage``: restore the student and carry on."""
        assert path is not None
        if self.student is None or stage.student_init is not None:
            self.student = self.build_student(stage.student_init or self.run.student_init)
        ckpt.load_checkpoint(path, model=self.student, restore_rng=True, strict=True)
        self._publish(stage, self.student)

    def finish(self, seconds: float) -> dict[str, Any]:
        """Evaluate teachers and student on the test split, export, plot and summarise."""
        run, out = self.run, {}
        assert self.student is not None or all(s.trains_teacher for s in run.stages)
        rows: list[dict[str, Any]] = []
        eval_bs = int(run.stages[-1].training["eval_batch_size"])
        test = run.test_data
        models: list[tuple[str, GkdModel]] = []
        for t in run.teachers:
            if test is not None:
                models.append((f"teacher:{t.name}", self.teacher(t.name)))
        if self.student is not None:
            models.append(("student", self.student))
        for label, model in models:
            row: dict[str, Any] = {"model": label, "parameters": count_parameters(model),
                                   "layers": model.model_config.num_layers}
            if test is not None:
                try:
                    ev = self.evaluate(model, test, eval_bs)
                except Exception as exc:  # e.g. a teacher without a task head
                    row["error"] = f"{type(exc).__name__}: {exc}"
                else:
                    row |= {ev.metric: ev.value, "eval_loss": ev.loss, "throughput": ev.throughput}
            rows.append(row)
        if test is not None and self.task == "sequence_classification":
            out["majority_baseline"] = _majority(self.dataset(test))
        export_dir = None
        if self.student is not None and run.export["enabled"]:
            export_dir = Path(run.export.get("dir") or self.run_dir / "export")
            export_hf(self.student, export_dir, tokenizer_dir=self._tokenizer_dir())
            if self._labels is not None:
                self._labels.save(export_dir / "labels.json")
        plot = plot_losses(self.run_dir) if run.logging["plot"] and self.metrics is not None else None
        out |= {"name": run.name, "run_dir": str(self.run_dir), "global_step": self.state.global_step,
                "seconds": round(seconds, 1), "models": rows,
                "export": str(export_dir) if export_dir else None, "plot": str(plot) if plot else None,
                "teachers": self.state.teacher_paths}
        if self.metrics is not None:
            self.metrics.write_summary(out)
        return out


# ---------------------------------------------------------------------------- helpers


RESUME_INDEPENDENT = ("logging", "checkpoint", "export")
"""Config sections that may change between a run and its resumption."""


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Paths where two configs differ (sections in :data:`RESUME_INDEPENDENT` ignored at the top)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            if not path and key in RESUME_INDEPENDENT:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(sub)
            else:
                out += config_differences(saved[key], current[key], sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True)) for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [path]


def _jsonable(stage: StageConfig) -> dict[str, Any]:
    d = {k: v for k, v in stage.__dict__.items() if k not in ("student_init",)}
    return json.loads(json.dumps(d, default=str))


def _majority(data: TaskDataset) -> float:
    labels = [int(data.collate([i])["labels"][0]) for i in range(len(data))]
    return max(labels.count(c) for c in set(labels)) / max(len(labels), 1)


def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _progress(enabled: bool, total: int, start: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def format_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table: accuracy/perplexity, parameters and throughput per model."""
    rows = summary["models"]
    metric = next((k for k in ("accuracy", "perplexity") if any(k in r for r in rows)), None)
    header = ["model", "layers", "parameters"] + ([metric, "examples/s"] if metric else [])
    lines = [header]
    for r in rows:
        line = [r["model"], str(r["layers"]), f"{r['parameters'] / 1e6:.1f}M"]
        if metric:
            line += [f"{r[metric]:.4f}" if metric in r else r.get("error", "-"),
                     f"{r['throughput']:.1f}" if "throughput" in r else "-"]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)
    if "majority_baseline" in summary:
        text += f"\nmajority-class baseline accuracy: {summary['majority_baseline']:.4f}"
    return text


__all__ = ["Evaluation", "Trainer", "TrainingInterrupted", "format_table"]
