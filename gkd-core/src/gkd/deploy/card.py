"""The model card (``README.md``) of an export: what the student is, what it was distilled from
(teachers with their sha256), how (stages, methods), on what data, how well, and with which
versions of gkd and its plugins."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gkd import __version__
from gkd.config.resolve import merged_section
from gkd.deploy.parity import Parity
from gkd.deploy.source import StudentSource
from gkd.models import ModelConfig

PIPELINE_TAGS = {"classification": "text-classification", "mlm": "fill-mask", "lm": "text-generation",
                 "none": "feature-extraction"}
HEAD_WORDS = {"classification": "a sequence-classification head", "mlm": "a masked-LM head",
              "lm": "a causal-LM head", "none": "no head"}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _length(stage: Mapping[str, Any]) -> str:
    if stage.get("steps") is not None:
        return f"{stage['steps']} steps"
    epochs = stage.get("epochs")
    return f"{epochs:g} epoch{'s' if epochs != 1 else ''}" if epochs is not None else "-"


def _methods(stage: Mapping[str, Any]) -> str:
    parts = []
    for m in stage.get("methods") or []:
        config = ", ".join(f"{k} {v}" for k, v in (m.get("config") or {}).items())
        weight = m.get("weight", 1.0)
        parts.append(f"{m['name']} (weight {weight:g}{'; ' + config if config else ''})")
    return "; ".join(parts) or "task loss only"


def method_origins(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{method: (distribution, version)}`` of installed methods among ``names``."""
    from gkd.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    wanted = set(names)
    return {m.spec.name: (m.origin.distribution, m.origin.version) for m in registry if m.spec.name in wanted}


def stage_metrics(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per stage, from ``metrics.jsonl``: the last training record and the last evaluation."""
    out: dict[str, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") in ("train", "eval") and "stage" in record:
            out.setdefault(record["stage"], {})[record["kind"]] = record
    return out


def _teacher_rows(source: StudentSource) -> list[list[str]]:
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.engine.chain import TEACHER_META
    from gkd.engine.fingerprint import sha256_of_checkpoint
    from gkd.engine.serialize import CheckpointError

    configured = {t["name"]: t["path"] for t in source.raw.get("teachers", [])}
    rows = []
    for name, ref in source.state.get("teachers", {}).items():
        path, note = Path(ref["path"]), ""
        meta_path = path / TEACHER_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            origin = meta.get("source", "?")  # resolved when the run started
            note = f"fine-tuned by stage `{meta.get('stage', '?')}` from `{configured.get(name, origin)}`"
            try:
                note += f" (sha256 `{sha256_of_checkpoint(resolve_path(str(origin), Path.cwd()))}`)"
            except (PathResolutionError, CheckpointError, OSError):
                pass  # the source moved since the run; its fingerprint is in the fine-tuned teacher's record
        elif name not in configured:
            note = "published by a stage of this run (teacher assistant)"
        rows.append([name, f"`{path}`", f"`{ref['sha256']}`", note or "as configured"])
    return rows


def model_card(source: StudentSource, cfg: ModelConfig, *, parameters: int, fmt: str, dtype: str, quantize: str,
               checks: Sequence[Parity]) -> str:
    """The ``README.md`` of an export (Hugging Face model-card front matter, then Markdown)."""
    raw, state = source.raw, source.state
    stages = list(raw.get("stages", []))
    used = sorted({m["name"] for s in stages[: source.stage_index + 1] for m in s.get("methods") or []})
    tags = ["gkd", "knowledge-distillation"] + used + (["onnx"] if fmt == "onnx" else [])
    lines = ["---", "library_name: transformers", f"pipeline_tag: {PIPELINE_TAGS[cfg.head]}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {raw.get('name', source.run_dir.name)}: distilled student (stage `{source.stage}`)", ""]
    kind = "MobileBERT" if cfg.is_mobilebert else {"encoder": "BERT-style encoder", "decoder": "Llama-style decoder"}[cfg.family]
    lines += [f"A {cfg.num_layers}-layer {kind} (hidden size {cfg.hidden_size}, {cfg.num_attention_heads} attention "
              f"heads, {parameters / 1e6:.1f}M parameters) with {HEAD_WORDS[cfg.head]}"
              + (f" over {cfg.num_labels} labels" if cfg.head == "classification" else "")
              + f", distilled with [gkd](https://arxiv.org/abs/2306.06629) {__version__}. It is the student at the "
              f"end of stage `{source.stage}` (global step {state.get('global_step')}) of the run "
              f"`{raw.get('name')}` (`{source.run_dir}`).", ""]
    lines += ["## Teachers", ""]
    lines += [*_table(["name", "checkpoint used", "sha256 (weights)", "origin"], _teacher_rows(source)), ""]
    init = raw.get("student", {}).get("init", {})
    described = ", ".join(f"{k} {v}" for k, v in init.items() if k != "strategy")
    lines += ["## Training", "", f"Student initialisation: `{init.get('strategy')}`"
              + (f" ({described})" if described else "") + ".", ""]
    rows = []
    for i, s in enumerate(stages):
        optimizer, training = (merged_section(raw, s, key) for key in ("optimizer", "training"))
        rows.append([i + 1, f"`{s['name']}`" + (" (this export)" if i == source.stage_index else ""),
                     s.get("train", "student"), _methods(s), _length(s), optimizer.get("lr", "-"),
                     training.get("batch_size", "-")])
    lines += [*_table(["#", "stage", "trains", "methods", "length", "lr", "batch"], rows), ""]
    lines += _data_section(raw, source.labels)
    lines += _metrics_section(source, cfg)
    lines += _export_section(fmt, dtype, quantize, checks, cfg)
    lines += _versions_section(used)
    return "\n".join(lines).rstrip() + "\n"


def _data_section(raw: Mapping[str, Any], labels: Sequence[str] | None) -> list[str]:
    task = raw.get("task", {})
    lines = ["## Data", "", f"Task `{task.get('type')}`, {task.get('max_length')} tokens per example.", ""]
    rows = [[split, f"`{d.get('path')}`", d.get("format", "auto"),
             f"{d.get('text_field', 'text')} / {d.get('label_field', 'label')}", d.get("limit") or "all"]
            for split, d in (raw.get("data") or {}).items() if isinstance(d, dict)]
    lines += [*_table(["split", "path", "format", "text / label field", "examples"], rows), ""]
    if labels:
        lines += ["Labels (class id order): " + ", ".join(f"`{x}`" for x in labels) + ".", ""]
    return lines


def _metrics_section(source: StudentSource, cfg: ModelConfig) -> list[str]:
    lines = ["## Metrics", ""]
    if source.final and source.summary is not None:
        models = source.summary.get("models", [])
        metric = next((k for k in ("accuracy", "perplexity") if any(k in r for r in models)), None)
        if metric:
            lines += ["On the run's test split (from `summary.json`; examples/s is PyTorch inference on the machine "
                      "that ran it):", ""]
            lines += [*_table(["model", "layers", "parameters", metric, "examples/s"], [[r["model"], r["layers"], f"{r['parameters'] / 1000000.0:.1f}M", f"{r[metric]:.4f}" if metric in r else r.get("error", "-"), f"{r['throughput']:.1f}" if "throughput" in r else "-"] for r in models]), ""]
            if "majority_baseline" in source.summary:
                lines += [f"Majority-class baseline accuracy: {source.summary['majority_baseline']:.4f}.", ""]
    per_stage = stage_metrics(source.run_dir)
    names = [s["name"] for s in source.raw.get("stages", [])[: source.stage_index + 1]]
    rows = []
    for name in names:
        rec = per_stage.get(name, {})
        train, ev = rec.get("train"), rec.get("eval")
        terms = ", ".join(f"{k} {v:.4f}" for k, v in (train or {}).get("terms", {}).items())
        evaluated = ", ".join(f"{k} {v:.4f}" for k, v in (ev or {}).get("metrics", {}).items()) if ev else "-"
        rows.append([f"`{name}`", f"{train['loss']:.4f} ({terms})" if train else "-", evaluated])
    if any(r[1] != "-" for r in rows):
        lines += ["Last logged training loss and evaluation of each stage up to this one (`metrics.jsonl`):", ""]
        lines += [*_table(["stage", "training loss (terms)", "evaluation"], rows), ""]
    if len(lines) == 2:
        lines += ["No metrics were recorded for this stage.", ""]
    return lines


def _export_section(fmt: str, dtype: str, quantize: str, checks: Sequence[Parity], cfg: ModelConfig) -> list[str]:
    from gkd.deploy.hf import AUTO_CLASSES

    lines = ["## This export", ""]
    files = f"Hugging Face weights in {dtype} (`model.safetensors`, `config.json`, tokenizer files"
    files += ", `labels.json`)" if cfg.head == "classification" else ")"
    if fmt == "onnx":
        files += (f" and `model.onnx` ({'int8, dynamically quantised' if quantize == 'int8' else 'fp32'}; inputs "
                  "`input_ids`, `attention_mask` of shape [batch, sequence], both axes dynamic; output "
                  f"`{'last_hidden_state' if cfg.head == 'none' else 'logits'}`)")
    lines += [files + "; `gkd-export.json` records the export and its checks.", "",
              "Checked against the gkd model on fixed probe sentences when exported:", ""]
    lines += [f"- {p.line()}" for p in checks] + [""]
    auto = AUTO_CLASSES[cfg.head]
    lines += ["```python", f"from transformers import AutoTokenizer, {auto}",
              'model = ' + auto + '.from_pretrained("PATH")', 'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    if fmt == "onnx":
        lines += ["", "import onnxruntime", 'session = onnxruntime.InferenceSession("PATH/model.onnx")',
                  'batch = tokenizer(["some text"], return_tensors="np")',
                  'logits = session.run(None, {"input_ids": batch["input_ids"], '
                  '"attention_mask": batch["attention_mask"]})[0]']
    lines += ["```", "", "`gkd eval PATH --data FILE` measures accuracy or perplexity, examples/s and batch-1 latency "
              "under PyTorch and onnxruntime.", ""]
    return lines


def _versions_section(methods: Sequence[str]) -> list[str]:
    origins = method_origins(methods)
    lines = ["## Versions", ""]
    rows = [["gkd-core", __version__, "-"]]
    by_dist: dict[tuple[str, str], list[str]] = {}
    for method, dist in sorted(origins.items()):
        by_dist.setdefault(dist, []).append(method)
    rows += [[dist, version, ", ".join(ms)] for (dist, version), ms in sorted(by_dist.items())]
    rows += [[d, v, "-"] for d in ("torch", "megatron-core", "transformers", "onnx", "onnxruntime")
             if (v := _version(d)) is not None]
    lines += _table(["package", "version", "methods used"], rows)
    lines += ["", f"Exported on {datetime.date.today().isoformat()}.", ""]
    return lines


__all__ = ["method_origins", "model_card", "stage_metrics"]
