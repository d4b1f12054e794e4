"""``export.onnx`` in a run config: at the end of the run, the exported student also as
``model.onnx`` (checked against the gkd model of the export), evaluated on the test split for
the results table's row ``student (onnx fp32|int8)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gkd import __version__
from gkd.atomic import atomic_write_json
from gkd.deploy.onnx_export import export_onnx, run_session, session
from gkd.deploy.parity import probe_batches, reference_outputs
from gkd.engine.data import TaskDataset
from gkd.engine.evaluate import metric_pass
from gkd.models import count_parameters, from_pretrained


def onnx_row(export_dir: Path, *, quantize: str, raw: dict[str, Any], stage: str, test: TaskDataset | None,
             batch_size: int, seed: int) -> dict[str, Any]:
    """Write and check ``<export_dir>/model.onnx``; return its row of the results table.

    Args:
        export_dir: The run's Hugging Face export of the student.
        quantize: ``fp32`` or ``int8``.
        raw: The run config (recorded in ``gkd-export.json`` for ``gkd eval``).
        stage: The last stage's name.
        test: The test split (no metric without it).
        batch_size: Evaluation batch size.
        seed: The run's seed (the evaluation's MLM masks).

    Raises:
        GkdError: The extra is missing or the ONNX model misses its bound.
    """
    model = from_pretrained(export_dir, device="cpu").eval()
    cfg = model.model_config
    task = raw["task"]
    batches = probe_batches(export_dir, cfg, int(task.get("max_length", 128)))
    onnx = export_onnx(export_dir, cfg.head, reference_outputs(model, batches), batches,
                       quantize="int8" if quantize == "int8" else "none")
    atomic_write_json(export_dir / "gkd-export.json", {
        "gkd_version": __version__, "run": raw.get("name"), "stage": stage, "source": {"kind": "run", "path": str(export_dir)},
        "task": {"type": task["type"], "max_length": task.get("max_length", 128),
                 "mlm_probability": task.get("mlm_probability", 0.15)},
        "seed": seed, "data": raw.get("data"), "format": "onnx", "dtype": "fp32", "quantize": quantize,
        "checks": [onnx.parity.to_dict()], "onnx": onnx.to_dict()})
    row: dict[str, Any] = {"model": f"student (onnx {quantize})", "parameters": count_parameters(model),
                           "layers": cfg.num_layers, "onnx_check": onnx.parity.line()}
    if test is not None:
        sess = session(onnx.path, torch.get_num_threads())
        ev = metric_pass(lambda b: run_session(sess, b), test, batch_size, seed=seed)
        row |= {ev.metric: ev.value, "eval_loss": ev.loss, "throughput": len(test) / max(ev.seconds, 1e-9)}
    return row


__all__ = ["onnx_row"]
