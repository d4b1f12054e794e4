"""Where a run's student is: the run's export (final stage) or a stage-end checkpoint.

A run directory holds the fully defaulted run config next to every checkpoint
(``checkpoints/step-*/config.json``), each checkpoint's ``state.json`` (stage, teachers and
their sha256, labels and — since this module exists — the student's architecture), the label
vocabulary (``labels.json``), the summary of a finished run (``summary.json``) and the
exported student (``export/``). Every student stage saves a checkpoint at its end, and pruning
(``checkpoint.keep_last``) removes the oldest first, so the newest surviving checkpoint of a
stage is that stage's end whenever a later stage has started or the run has finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gkd.engine.checkpoint import list_checkpoints
from gkd.errors import GkdError
from gkd.models import GkdModel, ModelConfig

STUDENT_MODEL_KEY = "student_model"
"""Key of ``state.json``'s ``extra`` holding the student's :class:`ModelConfig` (as a dict)."""


@dataclass(frozen=True)
class StudentSource:
    """One stage's student of a run, and what describes it."""

    run_dir: Path
    stage: str
    stage_index: int
    final: bool
    """The run's last student stage."""
    kind: Literal["export", "checkpoint"]
    weights: Path
    """The export directory (Hugging Face layout) or the checkpoint directory."""
    checkpoint: Path
    """The checkpoint whose ``state.json`` describes the student (teachers, labels, steps)."""
    raw: dict[str, Any]
    """The run config saved with that checkpoint (fully defaulted)."""
    state: dict[str, Any]
    """That checkpoint's ``state.json``."""
    labels: list[str] | None
    tokenizer_dir: Path | None
    """A directory with the run's ``tokenizer.json``."""
    summary: dict[str, Any] | None
    """``summary.json`` of a finished run."""

    @property
    def task(self) -> str:
        return str(self.raw["task"]["type"])

    @property
    def max_length(self) -> int:
        return int(self.raw["task"].get("max_length", 128))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GkdError(f"{path}: cannot read ({e})") from None


def _trains(stage: Mapping[str, Any]) -> str:
    return str(stage.get("train", "student"))


def _export_dir(run_dir: Path, raw: Mapping[str, Any], summary: Mapping[str, Any] | None) -> Path:
    """The run's export directory: as its summary names it (when it still exists), else ``export.dir``
    (absolute) or ``<run_dir>/export``."""
    named = (summary or {}).get("export")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    configured = (raw.get("export") or {}).get("dir")
    if configured and Path(configured).expanduser().is_absolute():
        return Path(configured).expanduser()
    return run_dir / "export"


def find_student(run_dir: str | Path, stage: str | None = None) -> StudentSource:
    """The student of ``stage`` (default: the run's last student stage) in ``run_dir``.

    Raises:
        GkdError: No such run directory, no such stage, a stage that trains a teacher, a stage
            that has not finished or whose checkpoints were pruned (one line each).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GkdError(f"{run_dir}: no such run directory")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise GkdError(f"{run_dir}: not a gkd run directory with a trained student (no complete checkpoint in "
                       f"{run_dir / 'checkpoints'})")
    latest = checkpoints[-1][1]
    raw = _read_json(latest / "config.json")
    states = [(step, path, _read_json(path / "state.json")) for step, path in checkpoints]
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else None
    stages = list(raw.get("stages", []))
    names = [str(s.get("name")) for s in stages]
    students = [i for i, s in enumerate(stages) if _trains(s) == "student"]
    if not students:
        raise GkdError(f"{run_dir}: the run trains no student (every stage fine-tunes a teacher)")
    if stage is None:
        index = students[-1]
    elif stage not in names:
        raise GkdError(f"--stage: no stage '{stage}' in {run_dir} (its stages: {', '.join(names)})")
    else:
        index = names.index(stage)
        trains = _trains(stages[index])
        if trains != "student":
            teacher = trains.split(":", 1)[-1]
            raise GkdError(f"--stage: stage '{stage}' fine-tunes teacher '{teacher}', not the student; the fine-tuned "
                           f"teacher is already a Hugging Face directory: {run_dir / 'teachers' / teacher}")
    name = names[index]
    final = index == students[-1]
    mine = [(step, path, st) for step, path, st in states if int(st.get("stage_index", -1)) == index]
    later = any(int(st.get("stage_index", -1)) > index for _, _, st in states)
    latest_state = states[-1][2]
    if not mine:
        if later or summary is not None:
            raise GkdError(f"--stage: no checkpoint of stage '{name}' is left in {run_dir / 'checkpoints'} (pruned: "
                           f"checkpoint.keep_last is {raw.get('checkpoint', {}).get('keep_last')}); raise "
                           "checkpoint.keep_last to keep the end of every stage")
        at = names[int(latest_state.get("stage_index", 0))]
        raise GkdError(f"stage '{name}' of {run_dir} has not been trained yet (latest checkpoint: global step "
                       f"{latest_state.get('global_step')} in stage '{at}'); run `gkd distill` to finish it")
    if not later and summary is None:
        _, _, st = mine[-1]
        raise GkdError(f"stage '{name}' of {run_dir} has not finished (latest checkpoint: global step "
                       f"{st.get('global_step')}, stage step {st.get('stage_iteration')}); run `gkd distill` to "
                       "finish it, or name a finished stage with --stage")
    _, checkpoint, state = mine[-1]
    export = _export_dir(run_dir, raw, summary)
    use_export = final and summary is not None and (export / "config.json").is_file() \
        and (export / "model.safetensors").is_file()
    extra = state.get("extra", {})
    labels = extra.get("labels")
    if labels is None and (run_dir / "labels.json").is_file():
        labels = list(_read_json(run_dir / "labels.json")["labels"])
    return StudentSource(
        run_dir=run_dir, stage=name, stage_index=index, final=final,
        kind="export" if use_export else "checkpoint", weights=export if use_export else checkpoint,
        checkpoint=checkpoint, raw=raw, state=state, labels=[str(x) for x in labels] if labels else None,
        tokenizer_dir=_tokenizer_dir(export, raw, extra, index), summary=summary)


def _tokenizer_dir(export: Path, raw: Mapping[str, Any], extra: Mapping[str, Any], index: int) -> Path | None:
    """The run's tokenizer: its export's, else the student's source teacher's (as the checkpoint
    recorded its path), else any teacher's of the checkpoint."""
    candidates = [export]
    paths = {k: Path(v) for k, v in extra.get("teacher_paths", {}).items()}
    inits = [s["student_init"] for s in raw.get("stages", [])[: index + 1] if s.get("student_init")]
    init = inits[-1] if inits else raw.get("student", {}).get("init", {})
    if init.get("teacher") in paths:
        candidates.append(paths[init["teacher"]])
    candidates += list(paths.values())
    return next((p for p in candidates if (p / "tokenizer.json").is_file()), None)


def student_config(source: StudentSource) -> ModelConfig:
    """The student's architecture: recorded in the checkpoint, or (checkpoints of an older gkd)
    the run's export's, which is the same when no stage restarts the student (``student_init``).

    Raises:
        GkdError: Neither is available.
    """
    from gkd.models import load_model_config

    if source.kind == "export":
        return load_model_config(source.weights)
    recorded = source.state.get("extra", {}).get(STUDENT_MODEL_KEY)
    if recorded is not None:
        return model_config_from_dict(recorded)
    export = _export_dir(source.run_dir, source.raw, source.summary)
    restarts = any(s.get("student_init") for s in source.raw.get("stages", []))
    if restarts or not (export / "config.json").is_file():
        raise GkdError(f"{source.checkpoint}: the checkpoint does not record the student's architecture (written by an "
                       "older gkd) and the run's export cannot stand in for it; re-run the stage with this gkd")
    return load_model_config(export)


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint records (``dataclasses.asdict``; JSON turned the label ids into strings)."""
    fields = dict(data)
    if fields.get("id2label") is not None:
        fields["id2label"] = {int(k): str(v) for k, v in fields["id2label"].items()}
    known = ModelConfig.__dataclass_fields__
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def load_student(source: StudentSource) -> GkdModel:
    """The student of ``source`` in fp32 on the CPU, in eval mode.

    Raises:
        GkdError: The weights do not fit the architecture.
    """
    from gkd.engine.checkpoint import load_checkpoint
    from gkd.models import build_model, from_pretrained

    cfg = student_config(source)
    if cfg.dtype != "float32":  # a GPU run's bf16/fp16 student: evaluated and exported from fp32 here
        cfg = cfg.replace(dtype="float32")
    if source.kind == "export":
        try:
            model = from_pretrained(source.weights, cfg, strict=True, device="cpu")
        except (KeyError, ValueError) as e:
            raise GkdError(f"{source.weights}: the export does not load ({e})") from None
    else:
        model = build_model(cfg, init_weights=False, device="cpu")
        load_checkpoint(source.checkpoint, model=model, restore_rng=False, strict=True)
    return model.eval()


__all__ = ["STUDENT_MODEL_KEY", "StudentSource", "find_student", "load_student", "model_config_from_dict",
           "student_config"]
