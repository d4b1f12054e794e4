"""``gkd analyze RUN_DIR [RUN_B]``: which features matter — correlations of the recorded
teacher-student distances with the training loss and the task metric (tables and heat maps), or,
with two runs, which distances each one moved."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from gkd.analysis.correlate import (
    ALL,
    LOSS,
    MIN_POINTS,
    Correlation,
    Movement,
    compare,
    correlate_scopes,
    metric_name,
    scopes,
)
from gkd.analysis.records import ANALYSIS_FILE, METRICS_FILE, OUTPUT_DIR, read_jsonl, read_points
from gkd.atomic import atomic_write_bytes
from gkd.errors import GkdError


def _points(run_dir: Path) -> list[dict[str, Any]]:
    if not run_dir.is_dir():
        raise GkdError(f"{run_dir}: no such run directory")
    points = read_points(run_dir)
    if not points:
        raise GkdError(f"{run_dir}: no analysis records ({ANALYSIS_FILE}); train with analysis on, e.g. "
                       "gkd distill CONFIG --set analysis.every=50")
    return points


def _chosen(run_dir: Path, points: list[dict[str, Any]], scope: str, needed: int) -> list[dict[str, Any]]:
    """The points of ``scope``, at least ``needed`` of them."""
    found = scopes(points)
    if scope not in found:
        raise GkdError(f"--scope: {run_dir} has no stage '{scope}' with analysis records (scopes: {', '.join(found)})")
    chosen = list(found[scope])
    if len(chosen) < needed:
        raise GkdError(f"{run_dir / ANALYSIS_FILE}: {len(chosen)} point(s){'' if scope == ALL else f' in stage {scope}'}"
                       f", {'correlations need' if needed == MIN_POINTS else 'a comparison needs'} at least {needed}; "
                       "record more often (analysis.every)")
    return chosen


def _num(value: float, spec: str = "+.2f") -> str:
    return format(value, spec) if math.isfinite(value) else "-"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _csv(rows: Sequence[Sequence[Any]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode("utf-8")


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def correlation_rows(correlations: Sequence[Correlation]) -> list[list[Any]]:
    """The CSV of every correlation: scope order, then strongest first."""
    order = list(dict.fromkeys(c.scope for c in correlations))
    ranked = sorted(correlations, key=lambda c: (order.index(c.scope), -c.strength))
    return [["scope", "teacher", "layer", "feature", "distance", "target", "n", "spearman", "spearman_p", "pearson",
             "pearson_p"]] + [[c.scope, c.distance.teacher, c.distance.layer, c.distance.feature, str(c.distance),
                               c.target, c.n, c.spearman, c.spearman_p, c.pearson, c.pearson_p] for c in ranked]


def summary_table(correlations: Sequence[Correlation], targets: Sequence[str], top: int) -> tuple[str, int]:
    """Distances of one scope, strongest |ρ| over ``targets`` first: ρ and r per target. Returns the
    table of the first ``top`` and the number of distances in all."""
    by_distance: dict[str, dict[str, Correlation]] = {}
    for c in correlations:
        if c.target in targets:
            by_distance.setdefault(str(c.distance), {})[c.target] = c
    ranked = sorted(by_distance.items(), key=lambda item: -max(c.strength for c in item[1].values()))
    header = ["distance"] + [f"{t} {s}" for t in targets for s in ("ρ", "r")]
    rows = [header]
    for name, cs in ranked[:top]:
        rows.append([name] + [_num(getattr(cs[t], f)) if t in cs else "-" for t in targets
                              for f in ("spearman", "pearson")])
    return _table(rows), len(ranked)


def _heatmaps(correlations: Sequence[Correlation], points: Sequence[Mapping[str, Any]], targets: Sequence[str],
              out: Path) -> list[Path]:
    from gkd.analysis.figures import heatmap

    maps = points[-1].get("layer_maps") or {}
    written = []
    groups: dict[tuple[str, str, str], list[Correlation]] = {}
    for c in correlations:
        if c.target in targets:
            groups.setdefault((c.scope, c.distance.teacher, c.target), []).append(c)
    for (scope, teacher, target), cs in groups.items():
        n = max(c.n for c in cs)
        title = (f"{target} vs. distance to teacher '{teacher}' — "
                 f"{'whole run' if scope == ALL else f'stage {scope}'}, {n} points")
        path = out / f"heatmap_{_file_part(scope)}_{_file_part(teacher)}_{_file_part(target)}.png"
        written.append(heatmap(cs, path, title=title, layer_map=maps.get(teacher)))
    return written


def _analyze_one(run_dir: Path, scope: str, top: int, out: Path) -> None:
    points = _points(run_dir)
    chosen = _chosen(run_dir, points, scope, MIN_POINTS)
    metric = metric_name(points)
    targets = [LOSS] + ([metric] if metric else [])
    correlations = correlate_scopes(points)  # the files cover every scope; --scope picks the printed table
    out.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_bytes(out / "correlations.csv", _csv(correlation_rows(correlations)))
    stages = list(dict.fromkeys(p["stage"] for p in points))
    last = points[-1]
    probe, measured = last.get("probe") or {}, last.get("metric") or {}
    click.echo(f"{run_dir}: {len(points)} points over stage(s) {', '.join(stages)}; probe: {probe.get('examples')} "
               f"examples of {probe.get('split')}; {metric} on {measured.get('on')} ({measured.get('examples')} examples)")
    with_loss = sum(1 for p in chosen if isinstance(p.get("loss"), (int, float)))
    click.echo(f"correlations over {'the whole run' if scope == ALL else f'stage {scope}'}: {len(chosen)} points "
               f"({with_loss} with a training loss); strongest first")
    table, total = summary_table([c for c in correlations if c.scope == scope], targets, top)
    click.echo(table)
    if total > top:
        click.echo(f"... {total - top} more distance(s) in {csv_path}")
    figures = _heatmaps(correlations, points, targets, out)
    from gkd.analysis.figures import loss_terms

    curves = loss_terms(read_jsonl(run_dir / METRICS_FILE), out / "loss_terms.png")
    click.echo(f"wrote {csv_path}, {len(figures)} heat map(s) in {out}" + (f", {curves}" if curves else ""))


def _movement_table(moved: Sequence[Movement], top: int, names: tuple[str, str]) -> str:
    def ends(start: float, end: float, change: float) -> str:
        return f"{start:.4g} → {end:.4g} ({_num(100 * change, '+.0f')}%)"

    rows = [["distance", f"A: {names[0]}", f"B: {names[1]}", "A − B"]]
    for m in moved[:top]:
        rows.append([m.distance, ends(m.a_start, m.a_end, m.a_change), ends(m.b_start, m.b_end, m.b_change),
                     _num(100 * m.difference, "+.0f") + (" pts" if math.isfinite(m.difference) else "")])
    return _table(rows)


def _compare(run_a: Path, run_b: Path, scope: str, top: int, out: Path) -> None:
    a = _chosen(run_a, _points(run_a), scope, 2)
    b = _chosen(run_b, _points(run_b), scope, 2)
    moved = compare(a, b)
    if not moved:
        raise GkdError(f"{run_a} and {run_b} recorded no distance in common (different teachers or layers)")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = [["distance", "a_start", "a_end", "a_change", "b_start", "b_end", "b_change",
                              "difference"]]
    rows += [[m.distance, m.a_start, m.a_end, m.a_change, m.b_start, m.b_end, m.b_change, m.difference] for m in moved]
    path = atomic_write_bytes(out / f"compare_{_file_part(run_b.resolve().name)}.csv", _csv(rows))
    click.echo(f"change of each distance from the first to the last point ({'whole run' if scope == ALL else scope}),"
               " (end − start) / max(|start|, |end|); largest difference first")
    click.echo(_movement_table(moved, top, (str(run_a), str(run_b))))
    if len(moved) > top:
        click.echo(f"... {len(moved) - top} more distance(s) in {path}")
    else:
        click.echo(f"wrote {path}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("run_b", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--scope", default=ALL, show_default=True,
              help="The points to use: the whole run, or one stage's (by name).")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Distances printed (the CSV has all of them).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Where tables and figures go (default RUN_DIR/{OUTPUT_DIR}).")
def analyze(run_dir: Path, run_b: Path | None, scope: str, top: int, out: Path | None) -> None:
    """Correlate recorded feature distances with the loss and the task metric; with RUN_B, compare what each run moved.

    RUN_DIR must have been trained with analysis on (analysis.every > 0), which records
    analysis.jsonl. Writes correlations.csv, heat maps (feature kind x layer) and loss_terms.png to
    RUN_DIR/analysis; with RUN_B, compare_<RUN_B>.csv.
    """
    target = out or run_dir / OUTPUT_DIR
    if run_b is None:
        _analyze_one(run_dir, scope, top, target)
    else:
        _compare(run_dir, run_b, scope, top, target)
