"""The analysis records of a run directory: ``analysis.jsonl`` (one point per line) and its flat
copy ``analysis.csv``, written by :mod:`gkd.engine.analysis` during training and read by
``gkd analyze``. Neither torch nor any model is imported here.

A point is one measurement of the student against its teachers::

    {"stage": "kd", "stage_index": 2, "step": 20, "global_step": 270, "at": "step",
     "loss": 0.41, "terms": {"kd.soft": 0.12, "kd.hard": 0.29},
     "metric": {"name": "accuracy", "value": 0.91, "on": "test", "examples": 800},
     "probe": {"split": "test", "examples": 64}, "layer_maps": {"minilm": [1, 3, 5]},
     "distances": {"minilm:L1:hidden.mse": 0.052, "minilm:out:logits.kl_T1": 0.31, ...},
     "time": 1717000000.0}

``at`` is ``start`` (before the stage's first step; no ``loss``/``terms``), ``step`` or ``end``
(after the stage's last step). A distance is named ``TEACHER:LAYER:FEATURE.MEASURE``
(:class:`DistanceKey`): ``LAYER`` is ``emb`` (the embeddings, hidden state 0), ``L1`` … ``LS``
(student layer j, paired with the teacher layer of the point's ``layer_maps``) or ``out``
(the logits).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.atomic import atomic_write_bytes

ANALYSIS_FILE = "analysis.jsonl"
ANALYSIS_CSV = "analysis.csv"
METRICS_FILE = "metrics.jsonl"
"""The training records (:mod:`gkd.engine.metrics`), read for the loss curves."""
OUTPUT_DIR = "analysis"
"""Where ``gkd analyze`` writes its tables and figures, inside the run directory."""

EMBEDDINGS_LAYER = "emb"
LOGITS_LAYER = "out"
FIXED_COLUMNS = ("stage", "stage_index", "step", "global_step", "at", "loss", "metric", "metric_value")


@dataclass(frozen=True, order=True)
class DistanceKey:
    """One recorded distance: teacher, layer tag (``emb``, ``L1``…, ``out``) and ``feature.measure``."""

    teacher: str
    layer: str
    feature: str

    def __str__(self) -> str:
        return f"{self.teacher}:{self.layer}:{self.feature}"

    @classmethod
    def parse(cls, text: str) -> DistanceKey:
        teacher, layer, feature = text.split(":", 2)
        return cls(teacher, layer, feature)

    @property
    def layer_order(self) -> int:
        """Columns of a heat map: embeddings, student layers in order, logits."""
        if self.layer == EMBEDDINGS_LAYER:
            return 0
        if self.layer == LOGITS_LAYER:
            return 1 << 20
        return int(self.layer.removeprefix("L"))


def layer_tag(student_layer: int) -> str:
    """The tag of 0-based student layer ``student_layer`` (hidden state ``student_layer + 1``)."""
    return f"L{student_layer + 1}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (none when it does not exist); a line cut short by a crash is skipped."""
    if not Path(path).is_file():
        return []
    found = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def read_points(run_dir: Path) -> list[dict[str, Any]]:
    """Every point of ``<run_dir>/analysis.jsonl``, in recording order."""
    return [p for p in read_jsonl(Path(run_dir) / ANALYSIS_FILE) if isinstance(p.get("distances"), dict)]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def csv_text(points: Sequence[Mapping[str, Any]]) -> str:
    """The points as one CSV table: the fixed columns, ``term:NAME`` per loss term, then one column
    per distance (empty where a point has no such value)."""
    terms = list(dict.fromkeys(t for p in points for t in p.get("terms") or {}))
    distances = list(dict.fromkeys(d for p in points for d in p["distances"]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *(f"term:{t}" for t in terms), *distances])
    for p in points:
        metric = p.get("metric") or {}
        row = [p["stage"], p["stage_index"], p["step"], p["global_step"], p["at"], p.get("loss"),
               metric.get("name"), metric.get("value")]
        row += [(p.get("terms") or {}).get(t) for t in terms]
        row += [p["distances"].get(d) for d in distances]
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


class AnalysisLog:
    """Appends points to ``<run_dir>/analysis.jsonl`` and keeps ``analysis.csv`` in step with it.
    Only global rank 0 makes one.

    Args:
        run_dir: The run directory.
        keep_until: Resuming: ``(stage_index, step)`` of the point the run continues from; points
            after it (recorded by the interrupted run after its last checkpoint) are dropped, so the
            file holds each point once. None starts a fresh file.
    """

    def __init__(self, run_dir: Path, keep_until: tuple[int, float] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / ANALYSIS_FILE
        kept = [] if keep_until is None else [
            p for p in read_points(self.run_dir) if (p["stage_index"], p["step"]) <= keep_until]
        self.points: list[dict[str, Any]] = kept
        atomic_write_bytes(self.path, "".join(json.dumps(p) + "\n" for p in kept).encode("utf-8"))
        self._write_csv()

    def append(self, point: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")
            f.flush()
            os.fsync(f.fileno())  # points are minutes apart; a synced line survives a crash
        self.points.append(dict(point))
        self._write_csv()

    def _write_csv(self) -> None:
        atomic_write_bytes(self.run_dir / ANALYSIS_CSV, csv_text(self.points).encode("utf-8"))


def remove_records(run_dir: Path) -> None:
    """Remove the analysis files of an earlier run in ``run_dir`` (a fresh run without analysis)."""
    for name in (ANALYSIS_FILE, ANALYSIS_CSV):
        (Path(run_dir) / name).unlink(missing_ok=True)


def distance_keys(points: Iterable[Mapping[str, Any]]) -> list[DistanceKey]:
    """Every distance recorded in ``points``, in recording order."""
    return [DistanceKey.parse(k) for k in dict.fromkeys(k for p in points for k in p["distances"])]


__all__ = ["ANALYSIS_CSV", "ANALYSIS_FILE", "EMBEDDINGS_LAYER", "LOGITS_LAYER", "METRICS_FILE", "OUTPUT_DIR", "AnalysisLog",
           "DistanceKey", "csv_text", "distance_keys", "layer_tag", "read_jsonl", "read_points", "remove_records"]
