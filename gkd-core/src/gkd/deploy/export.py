"""``gkd export``: a run's student as a checked Hugging Face directory, optionally with ONNX.

The directory is assembled next to its destination and moved into place only after every
check passed, so a failed export leaves nothing (and an earlier export at the same place
intact). Files: ``model.safetensors``, ``config.json`` (with ``id2label``/``label2id``),
tokenizer files, ``labels.json`` (classifiers), ``README.md`` (the model card),
``gkd-export.json`` (what was exported from where, and the checks) and, for ``--format
onnx``, ``model.onnx``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd import __version__
from gkd.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from gkd.deploy.options import DTYPE_CHOICES, FORMATS, QUANTIZE_CHOICES, check_arguments
from gkd.deploy.parity import Parity, probe_batches, reference_outputs
from gkd.deploy.source import StudentSource, find_student, load_student
from gkd.errors import GkdError

META_FILE = "gkd-export.json"
CARD_FILE = "README.md"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and checked."""

    out: Path
    source: StudentSource
    fmt: str
    dtype: str
    quantize: str
    checks: list[Parity] = field(default_factory=list)
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def _destination(to: Path, run_dir: Path) -> None:
    """``--to`` must be new, empty or an earlier gkd export, and outside the run's own files."""
    to_r, run_r = to.resolve(), run_dir.resolve()
    if to_r == run_r or (run_r in to_r.parents and to_r.relative_to(run_r).parts[0] in ("checkpoints", "teachers")):
        raise GkdError(f"--to {to}: inside the run's own files; choose a directory outside "
                       f"{run_dir / 'checkpoints'} and {run_dir / 'teachers'}")
    if to.exists() and not to.is_dir():
        raise GkdError(f"--to {to}: exists and is not a directory")
    if to.is_dir() and any(to.iterdir()) and not (to / META_FILE).is_file():
        raise GkdError(f"--to {to}: exists, is not empty and is not an earlier gkd export; choose a new directory")


def export_run(run_dir: str | Path, to: str | Path, *, stage: str | None = None, fmt: str = "hf",
               dtype: str = "fp32", quantize: str = "none", echo: Any = None) -> ExportResult:
    """Export the student of ``stage`` (default: the final one) of ``run_dir`` into ``to``.

    Args:
        run_dir: A gkd run directory.
        to: Destination directory (new, empty, or an earlier gkd export, which is replaced).
        stage: A stage name; its stage-end checkpoint is exported.
        fmt: ``hf`` or ``onnx`` (the Hugging Face files plus ``model.onnx``).
        dtype: Weight dtype of an ``hf`` export.
        quantize: ``int8``: dynamic int8 quantisation of the ONNX graph.
        echo: Called with progress lines (default: silent).

    Raises:
        GkdError: Bad arguments, a missing extra, a run or stage that cannot be exported, or a
            failed check (one line; nothing is left at ``to``).
    """
    from gkd.deploy.card import model_card
    from gkd.deploy.hf import check_hf, write_hf
    from gkd.deploy.onnx_export import export_onnx
    from gkd.models import count_parameters

    say = echo or (lambda _line: None)
    started = time.perf_counter()
    check_arguments(fmt, dtype, quantize)
    run_dir, to = Path(run_dir), Path(to)
    source = find_student(run_dir, stage)
    _destination(to, run_dir)
    what = source.weights if source.kind == "export" else f"{source.checkpoint} (end of stage '{source.stage}')"
    say(f"student of stage '{source.stage}' from {what}")
    model = load_student(source)
    cfg = model.model_config
    batches = probe_batches(source.tokenizer_dir, cfg, source.max_length)
    reference = reference_outputs(model, batches)
    result = ExportResult(to, source, fmt, dtype, quantize)
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = to.with_name(f".{to.name}.tmp-export")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_hf(model, staging, tokenizer_dir=source.tokenizer_dir, labels=source.labels,
                 dtype=dtype if fmt == "hf" else "fp32")
        parity = check_hf(staging, cfg.head, dtype if fmt == "hf" else "fp32", reference, batches)
        say(parity.line())
        if not parity.ok:
            raise GkdError(f"{to}: the Hugging Face export does not match the gkd model: {parity.line()}")
        result.checks.append(parity)
        onnx_meta = None
        if fmt == "onnx":
            onnx = export_onnx(staging, cfg.head, reference, batches, quantize=quantize)
            say(onnx.parity.line())
            result.checks.append(onnx.parity)
            onnx_meta = onnx.to_dict()
        params = count_parameters(model)
        card = model_card(source, cfg, parameters=params, fmt=fmt, dtype=dtype, quantize=quantize,
                          checks=result.checks)
        atomic_write_bytes(staging / CARD_FILE, card.encode("utf-8"))
        atomic_write_json(staging / META_FILE, _meta(source, result, params, onnx_meta))
        _replace(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files = sorted(p.name for p in to.iterdir())
    result.seconds = time.perf_counter() - started
    return result


def _meta(source: StudentSource, result: ExportResult, parameters: int, onnx: dict[str, Any] | None) -> dict[str, Any]:
    raw = source.raw
    return {
        "gkd_version": __version__,
        "run": raw.get("name"), "run_dir": str(source.run_dir), "stage": source.stage,
        "stage_index": source.stage_index, "global_step": source.state.get("global_step"),
        "source": {"kind": source.kind, "path": str(source.weights)},
        "task": {"type": source.task, "max_length": source.max_length,
                 "mlm_probability": raw.get("task", {}).get("mlm_probability", 0.15)},
        "seed": raw.get("seed", 0), "data": raw.get("data"),
        "format": result.fmt, "dtype": result.dtype, "quantize": result.quantize, "parameters": parameters,
        "teachers": source.state.get("teachers", {}),
        "checks": [p.to_dict() for p in result.checks], "onnx": onnx,
    }


def _replace(staging: Path, to: Path) -> None:
    """Move ``staging`` to ``to``; an earlier export there is removed only once the new one is in place."""
    old = to.with_name(f".{to.name}.old-export")
    shutil.rmtree(old, ignore_errors=True)
    if to.exists():
        to.rename(old)
    staging.rename(to)
    fsync_dir(to.parent)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["CARD_FILE", "DTYPE_CHOICES", "FORMATS", "META_FILE", "QUANTIZE_CHOICES", "ExportResult",
           "check_arguments", "export_run"]
