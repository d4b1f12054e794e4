"""Run metrics: ``metrics.jsonl`` (one record per line), ``summary.json`` and the loss plot.

Training records look like ``{"kind": "train", "stage": "distill", "step": 9, "global_step": 19,
"loss": 0.71, "terms": {"tinybert.hidden": 0.52, ...}, "lr": 4.1e-05, "time": 1717000000.0}``;
evaluation records have ``"kind": "eval"`` and ``"metrics"`` instead of loss, terms and lr.
With ``logging.tensorboard`` / ``logging.wandb`` the same numbers also go to TensorBoard event files
under ``<run_dir>/tensorboard`` and a W&B run under ``<run_dir>/wandb`` (:mod:`gkd.engine.sinks`:
tags ``train/loss``, ``train/<term>``, ``train/lr``, ``eval/<metric>`` against the global step),
rewritten from ``metrics.jsonl`` whenever a run starts or resumes.

Every line is strict JSON: a NaN or infinite number is written as ``null`` (a step that
``training.nonfinite`` caught also carries ``"nonfinite": [names]``, ``"skipped"`` and
``"skipped_steps"``); readers treat ``null`` as a missing value.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gkd.atomic import atomic_write_bytes, atomic_write_json
from gkd.engine.sinks import (
    MetricSink,
    TensorBoardSink,
)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss_curve.png"


def _number(value: float | torch.Tensor) -> float:
    return float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """All records of ``<run_dir>/metrics.jsonl``; a line cut short by a crash is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLogger:
    """Appends training and evaluation records to ``<run_dir>/metrics.jsonl``.

    Args:
        run_dir: The run directory (created if needed).
        resume_global_step: Resuming from a checkpoint at this global step: records after it
            (logged by the interrupted run after its last checkpoint) are dropped so the file
            holds every step once. None starts a fresh file.
        tensorboard: Also write every record to TensorBoard event files under
            ``<run_dir>/tensorboard``; that directory is rebuilt from the kept records, so it
            holds exactly what ``metrics.jsonl`` holds.
        sinks: Further sinks to open once the file is settled (e.g. a W&B run,
            :class:`gkd.engine.sinks.WandbSink`), each given the run directory; they receive the
            kept records, then every new one.
    """

    def __init__(self, run_dir: Path, resume_global_step: int | None = None, *, tensorboard: bool = False,
                 sinks: Sequence[Callable[[Path], MetricSink]] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        kept = [] if resume_global_step is None else [
            r for r in read_records(self.run_dir) if int(r.get("global_step", -1)) <= resume_global_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
        openers = [TensorBoardSink] if tensorboard else []
        self._sinks: list[MetricSink] = [open_sink(self.run_dir) for open_sink in [*openers, *sinks]]
        for sink in self._sinks:
            for record in kept:
                sink.write(record)

    def _append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            # Metrics are written every few steps only; a synced line survives a crash.
            os.fsync(f.fileno())
        for sink in self._sinks:
            sink.write(record)

    def log_train(self, *, stage: str, step: int, global_step: int, loss: float | torch.Tensor,
                  terms: Mapping[str, float | torch.Tensor], lr: float, **extra: Any) -> dict[str, Any]:
        """Append a training record; tensors become floats. Returns the record."""
        record = {"kind": "train", "stage": stage, "step": step, "global_step": global_step, "loss": _number(loss),
                  "terms": {k: _number(v) for k, v in terms.items()}, "lr": float(lr), "time": time.time(), **extra}
        record = strict_json(record)
        self._append(record)
        return record

    def log_eval(self, *, stage: str, step: int, global_step: int,
                 metrics: Mapping[str, float | torch.Tensor], **extra: Any) -> dict[str, Any]:
        """Append an evaluation record (``metrics`` such as ``accuracy``, ``loss``). Returns it."""
        record = {"kind": "eval", "stage": stage, "step": step, "global_step": global_step,
                  "metrics": {k: _number(v) for k, v in metrics.items()}, "time": time.time(), **extra}
        record = strict_json(record)
        self._append(record)
        return record

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.run_dir)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write ``<run_dir>/summary.json`` atomically; it is the run's last record, so the
        sinks are closed too."""
        path = self.run_dir / SUMMARY_FILE
        atomic_write_json(path, dict(summary))
        self.close()
        return path

    def close(self) -> None:
        """Close the sinks, if any (``metrics.jsonl`` needs no closing)."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


def stage_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(global_step, stage)`` of each stage's first record, in step order."""
    starts: list[tuple[int, str]] = []
    for r in sorted(records, key=lambda r: r["global_step"]):
        if not starts or starts[-1][1] != r["stage"]:
            starts.append((r["global_step"], r["stage"]))
    return starts


def plot_losses(run_dir: Path, path: Path | None = None) -> Path | None:
    """Plot total loss and every term against the global step, with stage boundaries.

    Args:
        run_dir: Run directory with ``metrics.jsonl``.
        path: Output file; default ``<run_dir>/loss_curve.png``.

    Returns:
        The image path, or None when there is no training record to plot.
    """
    # The object-oriented API with an explicit Agg canvas leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in read_records(run_dir) if r.get("kind", "train") == "train" and "loss" in r]
    if not records:
        return None
    records.sort(key=lambda r: r["global_step"])
    steps = [r["global_step"] for r in records]
    # Parts of terms (``tinybert.hidden/2-4``, one layer pair's) stay in metrics.jsonl and the sinks.
    names = ["total", *dict.fromkeys(k for r in records for k in r.get("terms", {}) if "/" not in k)]
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values: list[float] = []
    for name in names:
        # NaN where a step has no such term, so a term used in stages 1 and 3 is not joined across 2.
        ys = [r["loss"] if name == "total" else r.get("terms", {}).get(name, math.nan) for r in records]
        ys = [math.nan if y is None else y for y in ys]  # a non-finite value, logged as null
        values += [v for v in ys if math.isfinite(v)]
        ax.plot(steps, ys, label=name, linewidth=2.0 if name == "total" else 1.0)
    if values and min(values) > 0:
        ax.set_yscale("log")
    for i, (step, stage) in enumerate(stage_starts(records)):
        if i:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    out = Path(path) if path is not None else Path(run_dir) / PLOT_FILE
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out
