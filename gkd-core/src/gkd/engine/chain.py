"""Teacher-assistant chains: every finished link is recorded, and reused while its inputs hold.

A *link* is a student stage with ``publish_as_teacher`` (TAKD, DGKD, or any method): its
student becomes a teacher of later stages. A link is **finished** when the stage ran to its
last step, its student was exported to ``<run_dir>/teachers/<name>/`` (Hugging Face layout,
the teacher later stages load), the stage-end state was copied to
``<run_dir>/teachers/<name>/link/`` (the student's weights, every RNG stream, the global step,
the teachers' sha256 and the metrics so far: what a resume at that stage's end would load), and
— written last, atomically — ``<run_dir>/teachers/<name>/gkd-teacher.json`` records the link's
fingerprint and the export's sha256.

The fingerprint covers everything that determines the link's result: the seed, task, label
vocabulary, student section, the parallel layout, every stage up to and including the link
(defaulted and resolved), the sha256 of every configured teacher and student source those stages
read (weights and ``config.json``) and of every data file they read. Earlier links and fine-tuned
teachers are derived from these, so they are covered too; their files are checked against the
hashes the stage-end state recorded.

A run that does not resume from a checkpoint reuses the longest prefix of the chain whose links
(and teacher fine-tuning stages) are finished with the current fingerprint: it skips those
stages, restores the stage-end state of the last of them and trains from the next stage on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from gkd.config.run import RunConfig, StudentInit
from gkd.engine import checkpoint as ckpt
from gkd.engine.fingerprint import file_sha256, sha256_of_checkpoint
from gkd.engine.metrics import METRICS_FILE, read_records
from gkd.engine.resume import ResumePoint
from gkd.engine.serialize import FORMAT_VERSION, CheckpointError, read_json, write_json

TEACHER_META = "gkd-teacher.json"
"""The record of a fine-tuned teacher or a finished link, in the teacher's directory (written last)."""
LINK_DIR = "link"
"""The stage-end state of a finished link, inside the published teacher's directory."""
LINK_FILES = ("model.safetensors", "rng.safetensors", "state.json")
"""What a link keeps of its stage-end checkpoint (no optimizer: the stage is over)."""


@dataclass(frozen=True)
class FinishedLink:
    """A link that may be reused: its stage, its published teacher and its stage-end state."""

    index: int
    teacher: str
    path: Path
    """The published teacher's directory."""
    point: ResumePoint
    """The stage-end state (``<path>/link``), loadable like a checkpoint."""

    @property
    def global_step(self) -> int:
        return self.point.state.global_step


def teacher_dir(run: RunConfig, name: str) -> Path:
    """Where a fine-tuned or published teacher ``name`` lives: ``<run_dir>/teachers/<name>``."""
    return run.run_dir / "teachers" / name


def read_meta(path: Path) -> dict[str, Any] | None:
    """The record in a teacher directory, or None (absent or unreadable)."""
    try:
        meta = json.loads((path / TEACHER_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def content_sha256(path: Path) -> str | None:
    """sha256 of a data file, or of a directory's files (names and contents); None when missing."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        lines = "".join(f"{file_sha256(p)}  {p.relative_to(path)}\n" for p in sorted(path.rglob("*")) if p.is_file())
        return hashlib.sha256(lines.encode()).hexdigest()
    return None


def source_sha256(path: Path) -> dict[str, str | None]:
    """A model source directory: its weights' sha256 (None without weight files) and its config.json's."""
    try:
        weights: str | None = sha256_of_checkpoint(path)
    except CheckpointError:
        weights = None
    config = Path(path) / "config.json"
    return {"weights": weights, "config": content_sha256(config) if config.is_file() else None}


def _init_source(init: StudentInit) -> Path | None:
    if init.teacher is not None or init.path is None:
        return None  # a teacher: hashed with the teachers
    return init.path / "export" if init.strategy == "run" else init.path


def link_fingerprint(run: RunConfig, index: int, labels: list[str] | None, data_parallel: int) -> str:
    """What the link of stage ``index`` (and everything before it) is made from; equal
    fingerprints mean equal results."""
    prefix = run.stages[: index + 1]
    inits = [run.student.init] + [s.student_init for s in prefix if s.student_init is not None]
    read = {t for s in prefix for t in s.used_teachers}
    read |= {s.trains_teacher for s in prefix if s.trains_teacher}
    read |= {i.teacher for i in inits if i.teacher}
    if run.teachers:
        read.add(run.teachers[0].name)  # the tokenizer may come from it
    teachers = {t.name: {"dtype": t.dtype, **source_sha256(t.path)} for t in run.teachers if t.name in read}
    init_sources = [p for p in map(_init_source, inits) if p is not None]
    sources = {str(p): source_sha256(p) for p in dict.fromkeys(init_sources)}
    data = [run.train_data] + [d for s in prefix for d in (s.train_data, s.eval_data) if d is not None]
    parts = {
        "format": 1,
        "stages": [dataclasses.asdict(s) for s in prefix],
        "student": dataclasses.asdict(run.student),
        "task": dataclasses.asdict(run.task),
        "seed": run.seed,
        "labels": labels,
        # The data-parallel size the link ran with (not the config's "auto"); timeout_s changes no result.
        "parallel": {k: v for k, v in dataclasses.asdict(run.parallel).items() if k != "timeout_s"}
        | {"data_parallel": data_parallel},
        "teachers": teachers,
        "sources": sources,
        "data": {str(d.path): content_sha256(d.path) for d in dict.fromkeys(data)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def forget_link(path: Path) -> None:
    """Invalidate a link before its teacher directory is rewritten (a crash then leaves no record)."""
    meta = read_meta(path)
    if meta is not None:
        (path / TEACHER_META).unlink(missing_ok=True)
        fsync_dir(path)


def _place(src: Path, dst: Path) -> None:
    """A hard link (checkpoint files are never rewritten in place), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def record_link(run: RunConfig, index: int, fingerprint: str, stage_end: Path) -> Path:
    """Mark the link of stage ``index`` finished: copy the stage-end state next to its exported
    teacher, then write the record (last). Global rank 0 only; the export must exist."""
    stage = run.stages[index]
    assert stage.publish_as_teacher is not None
    path = teacher_dir(run, stage.publish_as_teacher)
    state = read_json(stage_end / "state.json")
    tmp = path / f".{LINK_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in LINK_FILES:
        _place(stage_end / name, tmp / name)
    step = int(state["global_step"])
    records = [r for r in read_records(run.run_dir) if int(r.get("global_step", -1)) <= step]
    (tmp / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name in LINK_FILES}
    write_json(tmp / ckpt.COMPLETE, {"format": FORMAT_VERSION, "global_step": step, "files": files})
    fsync_dir(tmp)
    final = path / LINK_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(path)
    atomic_write_json(path / TEACHER_META, {
        "kind": "link", "fingerprint": fingerprint, "stage": stage.name, "stage_index": index, "global_step": step,
        "teacher": stage.publish_as_teacher, "sha256": sha256_of_checkpoint(path),
    })
    return path


def finished_link(run: RunConfig, index: int, fingerprint: str) -> FinishedLink | None:
    """The link of stage ``index`` if it is finished with ``fingerprint`` and its files are intact."""
    name = run.stages[index].publish_as_teacher
    if name is None:
        return None
    path = teacher_dir(run, name)
    meta = read_meta(path)
    if meta is None or meta.get("kind") != "link" or meta.get("fingerprint") != fingerprint:
        return None
    state_dir = path / LINK_DIR
    try:
        if not ckpt.is_complete(state_dir) or sha256_of_checkpoint(path) != meta.get("sha256"):
            return None
        state = ckpt.CheckpointState.from_dict(read_json(state_dir / "state.json"))
    except (CheckpointError, OSError, ValueError, TypeError):
        return None
    return FinishedLink(index, name, path, ResumePoint(state_dir, state))


def teachers_unchanged(link: FinishedLink, paths: dict[str, Path]) -> bool:
    """Whether the teachers the link was trained with still have the weights its state recorded."""
    for name, ref in link.point.state.teachers.items():
        try:
            if name not in paths or sha256_of_checkpoint(paths[name]) != ref.get("sha256"):
                return False
        except CheckpointError:
            return False
    return True


def restore_metrics(run: RunConfig, link: FinishedLink) -> None:
    """``metrics.jsonl`` as it was when the link finished (its stages are not logged again)."""
    saved = link.point.path / METRICS_FILE
    text = saved.read_text() if saved.is_file() else ""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.run_dir / METRICS_FILE, text.encode("utf-8"))


__all__ = ["LINK_DIR", "TEACHER_META", "FinishedLink", "content_sha256", "finished_link", "forget_link",
           "link_fingerprint", "read_meta", "record_link", "restore_metrics", "source_sha256", "teacher_dir",
           "teachers_unchanged"]
