"""Metrics log: records, resume without duplicate steps, summary and loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gkd.engine.metrics import MetricsLogger, plot_losses, read_records, stage_starts


def log_steps(logger: MetricsLogger, stage: str, steps: range, offset: int = 0) -> None:
    for s in steps:
        logger.log_train(stage=stage, step=s, global_step=offset + s, loss=torch.tensor(1.0 / (s + 1)),
                         terms={"tinybert.hidden": 0.5 / (s + 1), "kd.logits": torch.tensor(0.25)}, lr=1e-4)


def test_records_and_resume_truncation(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    log_steps(logger, "pretrain", range(6))
    logger.log_eval(stage="pretrain", step=5, global_step=5, metrics={"accuracy": torch.tensor(0.75)})
    log_steps(logger, "task", range(4), offset=6)  # global steps 6..9, then the run dies
    first = read_records(tmp_path)[0]
    assert first["kind"] == "train" and first["terms"] == {"tinybert.hidden": 0.5, "kd.logits": 0.25}
    assert first["loss"] == 1.0 and isinstance(first["time"], float)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "global_st')  # a line cut short by the crash

    # Resume from the checkpoint at global step 7: steps 8 and 9 will be logged again.
    resumed = MetricsLogger(tmp_path, resume_global_step=7)
    log_steps(resumed, "task", range(2, 5), offset=6)
    records = resumed.records()
    train_steps = [r["global_step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(11))  # every step exactly once, in order
    assert [r["metrics"] for r in records if r["kind"] == "eval"] == [{"accuracy": 0.75}]
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    # A fresh run in the same directory starts a new file.
    assert MetricsLogger(tmp_path).records() == []


def test_summary_and_plot(tmp_path: Path) -> None:
    assert plot_losses(tmp_path) is None  # nothing logged yet
    logger = MetricsLogger(tmp_path)
    log_steps(logger, "pretrain", range(5))
    log_steps(logger, "task", range(5), offset=5)
    path = logger.write_summary({"run": "t", "final_accuracy": 0.9})
    assert json.loads(path.read_text()) == {"run": "t", "final_accuracy": 0.9}
    assert stage_starts(logger.records()) == [(0, "pretrain"), (5, "task")]  # the marked boundaries
    image = plot_losses(tmp_path)
    assert image == tmp_path / "loss_curve.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "metrics.jsonl", "summary.json"]
