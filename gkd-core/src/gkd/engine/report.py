"""The end of a run: evaluate every teacher and the student on the test split, export the
student, plot the losses, write ``summary.json`` and format the table ``gkd distill`` prints."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd import parallel
from gkd.engine.assets import RunAssets
from gkd.engine.data import TaskDataset
from gkd.engine.evaluate import evaluate
from gkd.engine.metrics import MetricsLogger, plot_losses
from gkd.errors import GkdError
from gkd.models import GkdModel, count_parameters, export_hf

if TYPE_CHECKING:
    from gkd.engine.loop import StageTime


def _majority(data: TaskDataset) -> float:
    labels = [int(data.collate([i])["labels"][0]) for i in range(len(data))]
    return max(labels.count(c) for c in set(labels)) / max(len(labels), 1)


def model_rows(assets: RunAssets, student: GkdModel | None) -> list[dict[str, Any]]:
    """One row per teacher and the student: layers, parameters and, with a test split, the metric."""
    run = assets.run
    test = run.test_data
    models: list[tuple[str, GkdModel]] = [(f"teacher:{t.name}", assets.teacher(t.name)) for t in run.teachers
                                          if test is not None]
    if student is not None:
        models.append(("student", student))
    batch_size = run.stages[-1].training.eval_batch_size
    rows = []
    for label, model in models:
        row: dict[str, Any] = {"model": label, "parameters": count_parameters(model),
                               "layers": model.model_config.num_layers}
        if test is not None:
            if model.model_config.head != run.task.head:
                row["error"] = f"no {run.task.head} head"
            else:
                # An offloaded teacher is brought in once for its whole evaluation, not per batch.
                slot = assets.teachers.get(label.removeprefix("teacher:")) if label.startswith("teacher:") else None
                held = slot.residency.hold() if slot is not None and slot.residency is not None else contextlib.nullcontext()
                with held:
                    ev = evaluate(model, assets.dataset(test), batch_size, assets.placement, seed=run.seed)
                row |= {ev.metric: ev.value, "eval_loss": ev.loss, "throughput": ev.throughput}
        rows.append(row)
    return rows


def export_student(assets: RunAssets, student: GkdModel) -> Path:
    """The student as a Hugging Face checkpoint (plus ``labels.json`` for classification)."""
    out = assets.run.export.dir or assets.run.run_dir / "export"
    export_hf(student, out, tokenizer_dir=assets.tokenizer_dir())
    if assets.labels is not None and parallel.is_global_rank_zero():
        assets.labels.save(out / "labels.json")
    return out


def finish_run(assets: RunAssets, student: GkdModel | None, *, global_step: int, seconds: float,
               metrics: MetricsLogger | None, startup_seconds: float = 0.0,
               stages: Sequence[StageTime] = ()) -> dict[str, Any]:
    """Evaluate, export, plot and summarise; returns the summary (also ``summary.json``).

    ``seconds`` runs from the first stage to now; ``startup_seconds`` is what came before it (data,
    resume point), ``stages`` the stages this process trained.
    """
    began = time.perf_counter()
    run = assets.run
    if student is None and not all(s.trains_teacher for s in run.stages):
        raise GkdError("internal: the run ended without a student")
    summary: dict[str, Any] = {}
    rows = model_rows(assets, student)
    if run.test_data is not None and run.task.type == "sequence_classification":
        summary["majority_baseline"] = _majority(assets.dataset(run.test_data))
    export_dir = export_student(assets, student) if student is not None and run.export.enabled else None
    if export_dir is not None and run.export.onnx != "none":
        if parallel.is_global_rank_zero():
            from gkd.deploy.finish import onnx_row  # onnx and onnxruntime are imported only when asked for

            rows.append(onnx_row(export_dir, quantize=run.export.onnx, raw=run.raw, stage=run.stages[-1].name,
                                 test=assets.dataset(run.test_data) if run.test_data is not None else None,
                                 batch_size=run.stages[-1].training.eval_batch_size, seed=run.seed))
        parallel.barrier()
    plot = plot_losses(run.run_dir) if run.logging.plot and metrics is not None else None
    summary |= {"name": run.name, "run_dir": str(run.run_dir), "global_step": global_step,
                "seconds": round(seconds, 1), "models": rows,
                "export": str(export_dir) if export_dir else None, "plot": str(plot) if plot else None,
                "teachers": {k: str(v) for k, v in assets.teacher_paths.items()},
                "timings": {"startup_seconds": round(startup_seconds, 2), "stages": [t.as_dict() for t in stages],
                            "finish_seconds": round(time.perf_counter() - began, 2)}}
    if metrics is not None:
        metrics.write_summary(summary)
    return summary


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


def format_timings(summary: Mapping[str, Any]) -> str:
    """One line: where the run's wall time went (start-up, each stage trained here, the finish)."""
    timings = summary.get("timings")
    if not timings:
        return ""
    parts = [f"start-up {timings['startup_seconds']:.1f} s"]
    for t in timings["stages"]:
        rate = f", {t['examples_per_s']:.1f} examples/s" if t.get("examples_per_s") else ""
        rest = [f"{k.removesuffix('_seconds')} {t[k]:.1f} s" for k in
                ("setup_seconds", "evaluation_seconds", "checkpoints_seconds", "analysis_seconds") if t.get(k)]
        parts.append(f"{t['stage']} {t['seconds']:.1f} s ({t['steps']} steps in {t['training_seconds']:.1f} s{rate}"
                     + (f"; {', '.join(rest)}" if rest else "") + ")")
    parts.append(f"finish {timings['finish_seconds']:.1f} s (test evaluation, export)")
    return "time: " + ", ".join(parts)


__all__ = ["export_student", "finish_run", "format_table", "format_timings", "model_rows"]
