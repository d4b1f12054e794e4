"""Correlations of recorded feature distances with the training loss and the task metric, and the
comparison of two runs.

A *scope* is a set of points: ``all`` (the whole recorded trajectory) or one stage's. A *target*
is ``loss`` (the total training loss logged at the point's step; stage starts have none),
``term:NAME`` (one logged loss term), or the task metric (``accuracy``, or ``perplexity`` for
language-model stages). Each (scope, distance, target) gets Spearman's ρ and Pearson's r with
their p-values (:mod:`scipy.stats`), over the points where both values are finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gkd.analysis.records import DistanceKey, distance_keys
from gkd.errors import GkdError

MIN_POINTS = 3
"""Fewer points than this give no correlation."""
ALL = "all"
LOSS = "loss"


def scipy_stats() -> Any:
    """:mod:`scipy.stats`, or a one-line error naming the extra to install."""
    try:
        from scipy import stats
    except ImportError:
        raise GkdError("gkd analyze needs scipy, which is not installed: pip install 'gkd-core[analysis]'") from None
    return stats


@dataclass(frozen=True)
class Correlation:
    scope: str
    distance: DistanceKey
    target: str
    n: int
    """Points with both values finite."""
    spearman: float
    spearman_p: float
    pearson: float
    pearson_p: float

    @property
    def strength(self) -> float:
        """``|ρ|``, 0 when undefined (sorting key: strongest first)."""
        return abs(self.spearman) if math.isfinite(self.spearman) else 0.0


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def metric_name(points: Sequence[Mapping[str, Any]]) -> str | None:
    """The task metric the points recorded (``accuracy`` or ``perplexity``)."""
    return next((p["metric"]["name"] for p in points if isinstance(p.get("metric"), dict)), None)


def target_value(point: Mapping[str, Any], target: str) -> float | None:
    """A point's value of ``target`` (None when it has none)."""
    if target == LOSS:
        return _finite(point.get("loss"))
    if target.startswith("term:"):
        return _finite((point.get("terms") or {}).get(target.removeprefix("term:")))
    metric = point.get("metric") or {}
    return _finite(metric.get("value")) if metric.get("name") == target else None


def targets(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """``loss``, the metric, then every logged term, as recorded."""
    terms = dict.fromkeys(f"term:{t}" for p in points for t in p.get("terms") or {})
    metric = metric_name(points)
    return [LOSS, *([metric] if metric else []), *terms]


def scopes(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """``all`` and each stage (in run order) → its points."""
    out: dict[str, list[Mapping[str, Any]]] = {ALL: list(points)}
    for p in points:
        out.setdefault(p["stage"] if p["stage"] != ALL else f"stage:{ALL}", []).append(p)
    return out


def correlate(points: Sequence[Mapping[str, Any]], scope: str = ALL,
              target_names: Sequence[str] | None = None) -> list[Correlation]:
    """Every (distance, target) correlation over ``points`` (labelled ``scope``); pairs with fewer
    than :data:`MIN_POINTS` finite points are left out, constant series give NaN."""
    stats = scipy_stats()
    found = []
    for key in distance_keys(points):
        xs_all = [_finite(p["distances"].get(str(key))) for p in points]
        for target in target_names or targets(points):
            pairs = [(x, y) for x, y in zip(xs_all, (target_value(p, target) for p in points), strict=True)
                     if x is not None and y is not None]
            if len(pairs) < MIN_POINTS:
                continue
            xs, ys = zip(*pairs, strict=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant series: NaN, reported as such
                rho = stats.spearmanr(xs, ys)
                r = stats.pearsonr(xs, ys)
            found.append(Correlation(scope, key, target, len(pairs), float(rho.statistic), float(rho.pvalue),
                                     float(r.statistic), float(r.pvalue)))
    return found


def correlate_scopes(points: Sequence[Mapping[str, Any]]) -> list[Correlation]:
    """:func:`correlate` for ``all`` and for every stage with enough points."""
    return [c for scope, chosen in scopes(points).items() for c in correlate(chosen, scope)]


@dataclass(frozen=True)
class Movement:
    """How far each of two runs moved one distance from its first to its last point."""

    distance: str
    a_start: float
    a_end: float
    b_start: float
    b_end: float

    @staticmethod
    def change(start: float, end: float) -> float:
        """``(end − start) / max(|start|, |end|)``: −1 went to zero, +1 grew from zero, NaN stayed at zero."""
        scale = max(abs(start), abs(end))
        return (end - start) / scale if scale > 0 else math.nan

    @property
    def a_change(self) -> float:
        return self.change(self.a_start, self.a_end)

    @property
    def b_change(self) -> float:
        return self.change(self.b_start, self.b_end)

    @property
    def difference(self) -> float:
        """``a_change − b_change``; NaN when either is undefined."""
        return self.a_change - self.b_change


def _ends(points: Sequence[Mapping[str, Any]], single_teacher: bool) -> dict[str, tuple[float, float]]:
    """Distance (teacher name dropped for single-teacher runs) → (first, last) finite value."""
    out = {}
    for key in distance_keys(points):
        values = [v for v in (_finite(p["distances"].get(str(key))) for p in points) if v is not None]
        if len(values) >= 2:
            out[f"{key.layer}:{key.feature}" if single_teacher else str(key)] = (values[0], values[-1])
    return out


def compare(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> list[Movement]:
    """Every distance recorded (at least twice) in both runs, the largest difference in movement first.
    Runs with one teacher each are matched by layer and feature alone (teacher names may differ)."""
    single = all(len({k.teacher for k in distance_keys(points)}) == 1 for points in (a, b))
    ends_a, ends_b = _ends(a, single), _ends(b, single)
    moved = [Movement(k, *ends_a[k], *ends_b[k]) for k in ends_a if k in ends_b]
    return sorted(moved, key=lambda m: -abs(m.difference) if math.isfinite(m.difference) else math.inf)


__all__ = ["ALL", "LOSS", "MIN_POINTS", "Correlation", "Movement", "compare", "correlate", "correlate_scopes",
           "metric_name", "scipy_stats", "scopes", "target_value", "targets"]
