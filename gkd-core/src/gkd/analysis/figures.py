"""Figures of ``gkd analyze``: correlation heat maps laid out like the paper's Fig. 4/5 (feature
kind × layer) and the loss terms of every stage (its Fig. 6). matplotlib's object-oriented API
with an explicit Agg canvas: pyplot's global state is never touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gkd.analysis.correlate import Correlation
from gkd.analysis.records import EMBEDDINGS_LAYER, LOGITS_LAYER, DistanceKey
from gkd.atomic import atomic_write
from gkd.errors import GkdError

FEATURE_ORDER = ("hidden.mse", "hidden.cos", "hidden.rel_kl", "query.mse", "query.rel_kl", "key.mse", "key.rel_kl",
                 "value.mse", "value.rel_kl", "scores.mse", "probs.mse", "probs.kl")
"""Rows of a heat map, top to bottom (the logits' ``logits.kl_T<τ>`` rows follow, by τ)."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GkdError("gkd analyze needs matplotlib, which is not installed: pip install 'gkd-core[analysis]'") from None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    # savefig picks the format from the suffix; the temporary name keeps it.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path


def _row_key(feature: str) -> tuple[int, float, str]:
    if feature in FEATURE_ORDER:
        return (0, FEATURE_ORDER.index(feature), feature)
    found = re.fullmatch(r"logits\.kl_T([0-9.eE+-]+)", feature)
    return (1, float(found.group(1)), feature) if found else (2, 0.0, feature)


def _column_label(key: DistanceKey, layer_map: Sequence[int] | None) -> str:
    if key.layer in (EMBEDDINGS_LAYER, LOGITS_LAYER):
        return key.layer
    student = int(key.layer.removeprefix("L"))
    return f"S{student}/T{layer_map[student - 1] + 1}" if layer_map else key.layer


def heatmap(correlations: Sequence[Correlation], path: Path, *, title: str,
            layer_map: Sequence[int] | None = None) -> Path:
    """Spearman (left) and Pearson (right) of one scope, teacher and target: rows feature kinds,
    columns the embeddings, the student layers (``S1/T2``: student layer 1 with teacher layer 2,
    both 1-based) and the logits; colour = correlation, blank = not recorded or undefined."""
    rows = sorted({c.distance.feature for c in correlations}, key=_row_key)
    columns = sorted({c.distance for c in correlations}, key=lambda k: k.layer_order)
    layers = list(dict.fromkeys(k.layer for k in columns))
    labels = {k.layer: _column_label(k, layer_map) for k in columns}
    fig = _figure(3.2 + 0.9 * len(layers) * 2, 1.4 + 0.32 * len(rows))
    axes = fig.subplots(1, 2, sharey=True)
    cell = {(c.distance.feature, c.distance.layer): c for c in correlations}
    image = None
    for ax, (name, field) in zip(axes, (("Spearman ρ", "spearman"), ("Pearson r", "pearson")), strict=True):
        grid = [[getattr(cell[(f, layer)], field) if (f, layer) in cell else math.nan for layer in layers]
                for f in rows]
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
        for y, line in enumerate(grid):
            for x, value in enumerate(line):
                if math.isfinite(value):
                    ax.text(x, y, f"{value:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(value) > 0.6 else "black")
        ax.set_xticks(range(len(layers)), [labels[layer] for layer in layers], fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_facecolor("#eeeeee")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def loss_terms(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One panel per stage: the total loss and every logged term against the stage's step (the
    paper's Fig. 6). None when there is no training record."""
    stages: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("kind", "train") == "train" and "loss" in r:
            stages.setdefault(str(r["stage"]), []).append(r)
    if not stages:
        return None
    cols = min(3, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig = _figure(5.0 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (stage, recs) in zip(axes.flat, stages.items(), strict=False):
        recs = sorted(recs, key=lambda r: r["step"])
        steps = [r["step"] for r in recs]
        # A term's layer-pair parts (``tinybert.hidden/1-2``) are in metrics.jsonl, not in this figure.
        names = ["total", *dict.fromkeys(k for r in recs for k in r.get("terms", {}) if "/" not in k)]
        positive = True
        for name in names:
            ys = [r["loss"] if name == "total" else r.get("terms", {}).get(name, math.nan) for r in recs]
            ys = [math.nan if y is None else y for y in ys]  # metrics.jsonl writes a non-finite value as null
            positive = positive and all(y > 0 for y in ys if math.isfinite(y))
            ax.plot(steps, ys, label=name, linewidth=1.8 if name == "total" else 1.0)
        if positive:
            ax.set_yscale("log")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss (weighted)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.set_visible(False)
    return _save(fig, path)


__all__ = ["FEATURE_ORDER", "heatmap", "loss_terms"]
