"""``gkd eval``: an exported model's accuracy (classification) or perplexity (LMs), throughput and
batch-1 latency under PyTorch (gkd's model, :func:`gkd.engine.evaluate.evaluate`) and under
onnxruntime, on the CPU.

Data is read and tokenised as a run reads it (:mod:`gkd.engine.readers`, :class:`TaskDataset`;
the same ``format``/``text_field``/``label_field``/``limit`` options, ``limit`` drawn with the
seed), so with the run's seed the numbers are those of the run's own evaluation. The ONNX pass
computes its metric exactly as gkd's evaluation does (same batches, same MLM masks, loss summed
per example or per labelled token).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gkd.config.run import DatasetConfig, TaskType
from gkd.deploy.onnx_export import ONNX_FILE, require_onnx, run_session, session
from gkd.engine.data import TaskDataset
from gkd.engine.evaluate import Predict, metric_pass
from gkd.engine.labels import LabelVocab
from gkd.engine.readers import read_examples
from gkd.errors import GkdError
from gkd.models import ModelConfig

RUNTIMES = ("torch", "onnx", "both")
TASK_OF_HEAD: dict[str, TaskType] = {"classification": "sequence_classification", "mlm": "masked_lm",
                                     "lm": "causal_lm"}


@dataclass(frozen=True)
class RuntimeResult:
    """One runtime's numbers."""

    runtime: str
    """``torch (fp32)``, ``onnx (fp32)`` or ``onnx (int8)``."""
    metric: str
    value: float
    loss: float
    examples: int
    throughput: float
    """Examples per second over the whole split at the chosen batch size."""
    p50_ms: float
    p95_ms: float
    """Latency of one example (batch 1), over :attr:`latency_examples` examples."""
    latency_examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, self.metric: self.value, "loss": self.loss, "examples": self.examples,
                "examples_per_s": self.throughput, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms,
                "latency_examples": self.latency_examples}


@dataclass(frozen=True)
class ExportMeta:
    """What ``gkd-export.json`` (or, without it, ``config.json``) says about a model directory."""

    task: TaskType
    max_length: int
    seed: int
    mlm_probability: float
    onnx_quantize: str | None


def read_meta(model_dir: Path, cfg: ModelConfig) -> ExportMeta:
    """From ``gkd-export.json``; for a run's own ``export/`` without one, from the run's config (task,
    seed); else from ``config.json`` (the task of its head, 128 tokens, seed 0)."""
    path = model_dir / "gkd-export.json"
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not meta:
        from gkd.engine.checkpoint import find_latest

        latest = find_latest(model_dir.parent)
        if latest is not None and (latest / "config.json").is_file():
            raw = json.loads((latest / "config.json").read_text(encoding="utf-8"))
            meta = {"task": raw.get("task", {}), "seed": raw.get("seed", 0)}
    task = meta.get("task", {})
    if cfg.head not in TASK_OF_HEAD:
        raise GkdError(f"{model_dir}: the model has no task head to evaluate (its config.json describes a bare "
                       "backbone)")
    onnx = meta.get("onnx") or {}
    return ExportMeta(task=task.get("type", TASK_OF_HEAD[cfg.head]), max_length=int(task.get("max_length", 128)),
                      seed=int(meta.get("seed", 0)), mlm_probability=float(task.get("mlm_probability", 0.15)),
                      onnx_quantize=onnx.get("quantize", "none") if (model_dir / ONNX_FILE).is_file() else None)


def _labels(model_dir: Path, cfg: ModelConfig) -> LabelVocab:
    if (model_dir / "labels.json").is_file():
        return LabelVocab.load(model_dir / "labels.json")
    if cfg.id2label:
        return LabelVocab([cfg.id2label[i] for i in sorted(cfg.id2label)])
    raise GkdError(f"{model_dir}: a classifier without label names (no labels.json, no id2label in config.json)")


def load_dataset(model_dir: Path, cfg: ModelConfig, meta: ExportMeta, data: DatasetConfig, max_length: int,
                 seed: int) -> TaskDataset:
    """``data`` tokenised by the model's tokenizer for its task (labels checked against the model's)."""
    from gkd.models import Tokenizer

    classify = meta.task == "sequence_classification"
    examples = read_examples(data, seed=seed, needs_labels=classify)
    tokenizer = Tokenizer.from_dir(model_dir, max_length)
    return TaskDataset(examples, tokenizer, meta.task, labels=_labels(model_dir, cfg) if classify else None,
                       mlm_probability=meta.mlm_probability)


@torch.no_grad()
def latency(predict: Predict, data: TaskDataset, examples: int, seed: int) -> tuple[float, float, int]:
    """``(p50 ms, p95 ms, n)`` of single-example calls over the first ``examples`` examples (after one warm-up call)."""
    n = min(examples, len(data))
    batches = [data.collate([i], torch.Generator().manual_seed(seed + i)) for i in range(n)]
    if not batches:
        return 0.0, 0.0, 0
    predict(batches[0])
    times = []
    for b in batches:
        start = time.perf_counter()
        predict(b)
        times.append((time.perf_counter() - start) * 1000.0)
    cuts = statistics.quantiles(times, n=100, method="inclusive") if len(times) > 1 else times * 99
    return statistics.median(times), cuts[94], n


def torch_predictor(model_dir: Path) -> tuple[Predict, Any]:
    """gkd's model of the export, fp32 on the CPU, as a predictor (and the model)."""
    from gkd.models import from_pretrained

    model = from_pretrained(model_dir, device="cpu").eval()

    def predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        assert out.logits is not None
        return out.logits

    return predict, model


def evaluate_export(model_dir: str | Path, data: DatasetConfig, *, runtime: str = "both", batch_size: int = 64,
                    max_length: int | None = None, seed: int | None = None, latency_examples: int = 100,
                    threads: int | None = None, echo: Callable[[str], None] | None = None) -> list[RuntimeResult]:
    """Evaluate the model in ``model_dir`` under ``runtime`` (``torch``, ``onnx`` or ``both``).

    Args:
        model_dir: A Hugging Face directory written by gkd (``gkd export`` or a run's ``export/``).
        data: The split (its ``path`` resolved).
        batch_size: Batch size of the metric pass (and of the examples/s figure).
        max_length: Tokens per example; default the run's ``task.max_length`` recorded by ``gkd export``, else 128.
        seed: Seed of ``limit``'s subset and MLM masking; default the run's seed recorded by ``gkd export``, else 0.
        latency_examples: Examples timed one by one for the batch-1 latency.
        threads: CPU threads of both runtimes (default torch's current setting).

    Raises:
        GkdError: Not a model directory, no ``model.onnx`` for the onnx runtime, a missing extra, bad data.
    """
    from gkd.engine.evaluate import evaluate
    from gkd.models import load_model_config
    from gkd.parallel.placement import Placement

    say = echo or (lambda _line: None)
    model_dir = Path(model_dir)
    if runtime not in RUNTIMES:
        raise GkdError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if batch_size < 1:
        raise GkdError(f"--batch-size: expected a positive number, got {batch_size}")
    if not (model_dir / "config.json").is_file():
        raise GkdError(f"{model_dir}: not a model directory (no config.json); pass a directory written by gkd export")
    cfg = load_model_config(model_dir)
    meta = read_meta(model_dir, cfg)
    wants_onnx = runtime in ("onnx", "both")
    if wants_onnx:
        if meta.onnx_quantize is None:
            raise GkdError(f"{model_dir}: no {ONNX_FILE} for --runtime {runtime}; export one with gkd export --format onnx")
        require_onnx(f"gkd eval --runtime {runtime}")
    if threads is not None:
        torch.set_num_threads(threads)
    seed = meta.seed if seed is None else seed
    dataset = load_dataset(model_dir, cfg, meta, data, max_length or meta.max_length, seed)
    say(f"{len(dataset)} examples from {data.path} ({meta.task}, {max_length or meta.max_length} tokens, "
        f"seed {seed}), {torch.get_num_threads()} CPU thread(s)")
    results = []
    if runtime in ("torch", "both"):
        predict, model = torch_predictor(model_dir)
        placement = Placement(torch.device("cpu"))
        predict(dataset.collate(list(range(min(batch_size, len(dataset)))), torch.Generator().manual_seed(seed)))
        ev = evaluate(model, dataset, batch_size, placement, seed=seed)
        p50, p95, n = latency(predict, dataset, latency_examples, seed)
        results.append(RuntimeResult("torch (fp32)", ev.metric, ev.value, ev.loss, ev.examples, ev.throughput,
                                     p50, p95, n))
        say(_line(results[-1]))
    if wants_onnx:
        sess = session(model_dir / ONNX_FILE, torch.get_num_threads())

        def onnx_predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return run_session(sess, batch)

        onnx_predict(dataset.collate(list(range(min(batch_size, len(dataset)))), torch.Generator().manual_seed(seed)))
        ev = metric_pass(onnx_predict, dataset, batch_size, seed=seed)
        p50, p95, n = latency(onnx_predict, dataset, latency_examples, seed)
        label = "int8" if meta.onnx_quantize == "int8" else "fp32"
        results.append(RuntimeResult(f"onnx ({label})", ev.metric, ev.value, ev.loss, ev.examples, ev.throughput,
                                     p50, p95, n))
        say(_line(results[-1]))
    return results


def _line(r: RuntimeResult) -> str:
    return (f"{r.runtime}: {r.metric} {r.value:.4f}, {r.throughput:.1f} examples/s, batch-1 latency p50 "
            f"{r.p50_ms:.1f} ms / p95 {r.p95_ms:.1f} ms")


def format_results(results: list[RuntimeResult], batch_size: int) -> str:
    """The table ``gkd eval`` prints, with the speed-up of ONNX over PyTorch when both ran."""
    metric = results[0].metric
    header = ["runtime", metric, "loss", f"examples/s (batch {batch_size})", "p50 ms (batch 1)", "p95 ms (batch 1)"]
    rows = [header] + [[r.runtime, f"{r.value:.4f}", f"{r.loss:.4f}", f"{r.throughput:.1f}", f"{r.p50_ms:.2f}",
                        f"{r.p95_ms:.2f}"] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    base = next((r for r in results if r.runtime.startswith("torch")), None)
    for r in results:
        if base is not None and r is not base:
            diff = (r.value - base.value) * (100 if metric == "accuracy" else 1)
            unit = " points" if metric == "accuracy" else ""
            text += (f"\n{r.runtime} vs {base.runtime}: {r.throughput / max(base.throughput, 1e-9):.2f}x examples/s, "
                     f"{base.p50_ms / max(r.p50_ms, 1e-9):.2f}x faster at batch 1 (p50), {metric} "
                     f"{diff:+.2f}{unit}")
    return text


__all__ = ["RUNTIMES", "ExportMeta", "RuntimeResult", "evaluate_export", "format_results", "latency", "load_dataset",
           "read_meta", "torch_predictor"]
